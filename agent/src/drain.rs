//! Leaving gracefully: when the collector tells the agent its member is leaving (it is already out of the
//! load balancer), the agent runs the operator's pre-stop command once, bounded by its timeout, and from
//! then on reports `drained`, so the collector may terminate the member before its drain deadline.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::watch;

use crate::Settings;
use crate::config::AgentConfig;

/// Watches the settings for `drain`; the returned flag turns true once the member is drained.
pub fn spawn(config: &AgentConfig, mut settings: watch::Receiver<Settings>) -> Arc<AtomicBool> {
    let drained = Arc::new(AtomicBool::new(false));
    let flag = drained.clone();
    let command = config.pre_stop_command.clone();
    let timeout = Duration::from_secs(config.pre_stop_timeout_secs.into());
    tokio::spawn(async move {
        while !settings.borrow_and_update().drain {
            if settings.changed().await.is_err() {
                return;
            }
        }
        tracing::info!("The collector is draining this member.");
        let _ = run_pre_stop(&command, timeout).await;
        flag.store(true, Ordering::Relaxed);
    });
    drained
}

/// How the pre-stop command ended; every way lets the member go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PreStop {
    /// None is configured.
    None,
    Finished,
    Failed,
    /// It did not finish within its timeout and was stopped.
    TimedOut,
}

/// Runs `command` (argv) to completion or until `timeout`; its failure is logged, never fatal.
pub async fn run_pre_stop(command: &[String], timeout: Duration) -> PreStop {
    let Some((program, args)) = command.split_first() else {
        return PreStop::None;
    };
    let mut child = match tokio::process::Command::new(program)
        .args(args)
        .kill_on_drop(true)
        .spawn()
    {
        Ok(child) => child,
        Err(e) => {
            tracing::warn!(command = %program, error = %e, "Cannot start the pre-stop command.");
            return PreStop::Failed;
        }
    };
    match tokio::time::timeout(timeout, child.wait()).await {
        Ok(Ok(status)) if status.success() => {
            tracing::info!("The pre-stop command finished.");
            PreStop::Finished
        }
        Ok(Ok(status)) => {
            tracing::warn!(%status, "The pre-stop command failed.");
            PreStop::Failed
        }
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "Cannot wait for the pre-stop command.");
            PreStop::Failed
        }
        Err(_) => {
            tracing::warn!(
                timeout_secs = timeout.as_secs(),
                "The pre-stop command did not finish in time; stopping it."
            );
            let _ = child.kill().await;
            PreStop::TimedOut
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(drain: bool) -> Settings {
        Settings {
            interval: Duration::from_secs(1),
            health: None,
            drain,
        }
    }

    #[tokio::test]
    async fn drained_after_the_pre_stop_command_and_only_when_told() {
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("stopped");
        let config = AgentConfig {
            pre_stop_command: vec![
                "sh".into(),
                "-c".into(),
                format!("sleep 0.2; touch {}", marker.display()),
            ],
            ..AgentConfig::default()
        };
        let (tx, rx) = watch::channel(settings(false));
        let drained = spawn(&config, rx);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!drained.load(Ordering::Relaxed), "not told to drain yet");
        tx.send_replace(settings(true));
        for _ in 0..100 {
            if drained.load(Ordering::Relaxed) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(drained.load(Ordering::Relaxed));
        assert!(marker.exists(), "the pre-stop command ran to the end first");
    }

    #[tokio::test]
    async fn a_pre_stop_command_that_hangs_is_cut_at_its_timeout() {
        let sleep = ["sleep".to_string(), "30".to_string()];
        assert_eq!(
            run_pre_stop(&sleep, Duration::from_millis(200)).await,
            PreStop::TimedOut
        );
        // One that fails or cannot start is only logged; none configured lets the member go at once.
        let exit = ["sh".to_string(), "-c".to_string(), "exit 4".to_string()];
        assert_eq!(run_pre_stop(&exit, Duration::from_secs(5)).await, PreStop::Failed);
        let missing = ["/nonexistent/pre-stop".to_string()];
        assert_eq!(run_pre_stop(&missing, Duration::from_secs(1)).await, PreStop::Failed);
        assert_eq!(run_pre_stop(&[], Duration::from_secs(1)).await, PreStop::None);
    }
}
