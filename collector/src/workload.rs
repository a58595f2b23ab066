//! The built-in workload that local instances run (`ebb-collector workload`, hidden): a small HTTP server
//! that behaves like a one-vCPU web server. `GET /work` burns `work_ms` of CPU, one request at a time, and
//! answers with the member's id; `GET /health` answers at once. Like a VM's web server it runs until it is
//! stopped (SIGTERM), whatever happens to the collector.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Connections served at once; more are answered 503.
const MAX_CONNECTIONS: usize = 256;

#[derive(Debug, Clone, clap::Args)]
pub struct WorkloadArgs {
    /// Address and port to serve on.
    #[arg(long)]
    pub listen: SocketAddr,
    /// Named in every answer, so a client can tell which member served it.
    #[arg(long)]
    pub member_id: String,
    /// CPU milliseconds each `GET /work` costs.
    #[arg(long, default_value_t = 20)]
    pub work_ms: u64,
}

pub fn run(args: WorkloadArgs) -> anyhow::Result<()> {
    let listener = TcpListener::bind(args.listen)?;
    let cpu = Arc::new(Mutex::new(()));
    let active = Arc::new(AtomicUsize::new(0));
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        if active.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
            active.fetch_sub(1, Ordering::SeqCst);
            let _ = respond(&stream, "503 Service Unavailable", &args.member_id, "busy\n");
            continue;
        }
        let (cpu, active, args) = (cpu.clone(), active.clone(), args.clone());
        std::thread::spawn(move || {
            let _ = serve(stream, &cpu, &args);
            active.fetch_sub(1, Ordering::SeqCst);
        });
    }
    Ok(())
}

fn serve(stream: TcpStream, cpu: &Mutex<()>, args: &WorkloadArgs) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    // Skip the headers.
    let mut line = String::new();
    while reader.read_line(&mut line)? > 2 {
        line.clear();
    }
    let path = request_line.split_whitespace().nth(1).unwrap_or("/");
    match path {
        "/health" => respond(&stream, "200 OK", &args.member_id, "ok\n"),
        "/work" => {
            {
                let _one_cpu = cpu.lock().unwrap_or_else(|e| e.into_inner());
                burn(Duration::from_millis(args.work_ms));
            }
            respond(&stream, "200 OK", &args.member_id, &format!("{}\n", args.member_id))
        }
        _ => respond(&stream, "404 Not Found", &args.member_id, "try /work or /health\n"),
    }
}

fn burn(duration: Duration) {
    let start = Instant::now();
    let mut x = 0u64;
    while start.elapsed() < duration {
        for i in 0..1000 {
            x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(i));
        }
    }
}

fn respond(mut stream: &TcpStream, status: &str, member_id: &str, body: &str) -> std::io::Result<()> {
    write!(
        stream,
        "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nX-Ebb-Member: {member_id}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    stream.flush()
}
