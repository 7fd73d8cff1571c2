//! The daemon under test, started from `OBSERVER_BIN` with its stdout captured.

use std::{
    io::{BufRead, BufReader, Read},
    process::{Child, Command, ExitStatus, Stdio},
    sync::mpsc,
    thread,
    time::Duration,
};

use serde_json::Value;

pub fn observer_bin() -> String {
    std::env::var("OBSERVER_BIN")
        .expect("OBSERVER_BIN is not set: run the kernel tests with `cargo xtask test`")
}

pub struct Observer {
    child: Child,
    lines: mpsc::Receiver<String>,
    stderr: Option<thread::JoinHandle<String>>,
    /// Every stdout line read so far, in order.
    pub seen: Vec<String>,
}

/// What the daemon wrote, once it has exited.
pub struct Finished {
    pub status: ExitStatus,
    pub lines: Vec<String>,
    pub stderr: String,
}

impl Finished {
    /// Every stdout line as JSON: panics on a line that is not a JSON object.
    pub fn records(&self) -> Vec<Value> {
        self.lines
            .iter()
            .map(|l| {
                let v: Value = serde_json::from_str(l)
                    .unwrap_or_else(|e| panic!("stdout line is not JSON ({e}): {l}"));
                assert!(v.is_object(), "stdout line is not a JSON object: {l}");
                v
            })
            .collect()
    }

    pub fn binds_of(&self, pids: &[u32]) -> Vec<Value> {
        self.records()
            .into_iter()
            .filter(|r| r["event"] == "bind" && pids.iter().any(|p| r["pid"] == *p))
            .collect()
    }
}

impl Observer {
    /// Starts `observer run ARGS` and waits for its `observer_start` record.
    pub fn start(args: &[&str]) -> (Observer, Value) {
        let mut child = Command::new(observer_bin())
            .arg("run")
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting the observer");
        let stdout = child.stdout.take().unwrap();
        let mut stderr = child.stderr.take().unwrap();
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stderr = thread::spawn(move || {
            let mut s = String::new();
            let _ = stderr.read_to_string(&mut s);
            s
        });
        let mut obs = Observer {
            child,
            lines: rx,
            stderr: Some(stderr),
            seen: Vec::new(),
        };
        let Some(first) = obs.next_line(Duration::from_secs(60)) else {
            let f = obs.wait();
            panic!("observer did not start ({}): {}", f.status, f.stderr)
        };
        let start: Value = serde_json::from_str(&first).expect("first line is JSON");
        assert_eq!(start["event"], "observer_start", "first record: {first}");
        (obs, start)
    }

    fn next_line(&mut self, timeout: Duration) -> Option<String> {
        let line = self.lines.recv_timeout(timeout).ok()?;
        self.seen.push(line.clone());
        Some(line)
    }

    /// Reads the stream until `want` records satisfy `pred` (counting those
    /// already read), or `timeout` passes; returns how many did.
    pub fn wait_for(
        &mut self,
        want: usize,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> usize {
        let deadline = std::time::Instant::now() + timeout;
        let count = |lines: &[String]| {
            lines
                .iter()
                .filter(|l| serde_json::from_str::<Value>(l).is_ok_and(|v| pred(&v)))
                .count()
        };
        let mut n = count(&self.seen);
        while n < want {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let Some(line) = self.next_line(left) else {
                break;
            };
            if serde_json::from_str::<Value>(&line).is_ok_and(|v| pred(&v)) {
                n += 1;
            }
        }
        n
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn signal(&self, sig: i32) {
        assert_eq!(unsafe { libc::kill(self.pid(), sig) }, 0, "kill({sig})");
    }

    /// SIGINT, then everything it wrote until it exited.
    pub fn stop(self) -> Finished {
        self.signal(libc::SIGINT);
        self.wait()
    }

    /// Waits for the daemon to exit by itself (with a generous bound), collecting its output.
    pub fn wait(mut self) -> Finished {
        while self.next_line(Duration::from_secs(120)).is_some() {}
        let status = self.child.wait().expect("waiting for the observer");
        Finished {
            status,
            lines: std::mem::take(&mut self.seen),
            stderr: self
                .stderr
                .take()
                .and_then(|h| h.join().ok())
                .unwrap_or_default(),
        }
    }
}

impl Drop for Observer {
    /// A failed test must not leave a daemon running.
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Ids of the BPF programs loaded in the kernel right now.
pub fn loaded_prog_ids() -> Vec<u32> {
    aya::programs::loaded_programs()
        .map(|p| p.expect("listing loaded BPF programs").id())
        .collect()
}

/// Those of `ids` still loaded after up to `within`. A process's exit closes
/// its links at once, but the kernel frees a program after a grace period
/// (RCU, a work queue): under load, a moment later.
pub fn still_loaded(ids: &[u32], within: std::time::Duration) -> Vec<u32> {
    let until = std::time::Instant::now() + within;
    loop {
        let loaded = loaded_prog_ids();
        let left: Vec<u32> = ids.iter().copied().filter(|i| loaded.contains(i)).collect();
        if left.is_empty() || std::time::Instant::now() > until {
            return left;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}
