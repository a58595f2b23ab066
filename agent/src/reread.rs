//! A kernel text file (`/proc/stat`, `/proc/loadavg`, ...) kept open and read again from its start at every
//! sample: the kernel regenerates it on each read from offset 0. One `pread` per sample replaces the path
//! lookup, the open, the size probe, the seeks, the read to the end and the close, every second of the VM's
//! life.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// Room for `/proc/stat` of a VM with a few dozen CPUs; grows when a file needs more.
const INITIAL_CAPACITY: usize = 4096;

#[derive(Debug, Default)]
pub struct Reread {
    open: Option<(PathBuf, File)>,
    /// Zeroed once, then reused: each read says how much of it is the file's text.
    bytes: Vec<u8>,
}

impl Reread {
    /// The file's whole text now. It is opened on first use (and again after an error, or if `path`
    /// changes).
    pub fn read(&mut self, path: &Path) -> io::Result<&str> {
        if self.open.as_ref().is_none_or(|(open, _)| open != path) {
            self.open = Some((path.to_path_buf(), File::open(path)?));
        }
        let (_, file) = self.open.as_ref().expect("opened above");
        let len = match read_whole(file, &mut self.bytes) {
            Ok(len) => len,
            Err(e) => {
                self.open = None;
                return Err(e);
            }
        };
        std::str::from_utf8(&self.bytes[..len]).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
    }
}

/// Reads `file` from offset 0 into `bytes`, growing it as needed, and returns the length read. A read that
/// leaves room in the buffer has reached the end (the kernel fills the whole buffer while it has text), so
/// a file that fits takes one system call.
fn read_whole(file: &File, bytes: &mut Vec<u8>) -> io::Result<usize> {
    if bytes.is_empty() {
        bytes.resize(INITIAL_CAPACITY, 0);
    }
    let mut len = 0;
    loop {
        let read = file.read_at(&mut bytes[len..], len as u64)?;
        len += read;
        if read == 0 || len < bytes.len() {
            return Ok(len);
        }
        bytes.resize(bytes.len() * 2, 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_read_sees_the_file_as_it_is_now() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("loadavg");
        std::fs::write(&path, "0.10 0.20 0.30 1/100 42\n").unwrap();
        let mut file = Reread::default();
        assert_eq!(file.read(&path).unwrap(), "0.10 0.20 0.30 1/100 42\n");
        std::fs::write(&path, "1.5 0.2 0.3 1/100 43\n").unwrap();
        assert_eq!(
            file.read(&path).unwrap(),
            "1.5 0.2 0.3 1/100 43\n",
            "shorter now: no stale tail"
        );
    }

    #[test]
    fn the_live_proc_files_read_again_from_the_start() {
        let mut stat = Reread::default();
        let first = stat.read(Path::new("/proc/stat")).unwrap().to_string();
        let second = stat.read(Path::new("/proc/stat")).unwrap();
        assert!(first.starts_with("cpu ") && second.starts_with("cpu "), "{second}");
    }

    #[test]
    fn a_file_larger_than_the_buffer_is_read_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("stat");
        let long: String = (0..1000)
            .map(|cpu| format!("cpu{cpu} 1 2 3 4 5 6 7 8 9 10\n"))
            .collect();
        assert!(long.len() > 4 * INITIAL_CAPACITY);
        std::fs::write(&path, &long).unwrap();
        let mut file = Reread::default();
        assert_eq!(file.read(&path).unwrap(), long);
        std::fs::write(&path, "cpu 1\n").unwrap();
        assert_eq!(file.read(&path).unwrap(), "cpu 1\n");
    }

    #[test]
    fn a_missing_file_is_an_error_and_is_tried_again() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cpu.stat");
        let mut file = Reread::default();
        assert!(file.read(&path).is_err());
        std::fs::write(&path, "usage_usec 5\n").unwrap();
        assert_eq!(file.read(&path).unwrap(), "usage_usec 5\n");
    }
}
