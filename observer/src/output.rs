//! The JSON Lines sink: one buffered writer, flushed once per batch.

use std::{
    io::{self, BufWriter, Stdout, Write},
    os::fd::{AsFd, OwnedFd},
};

use serde::Serialize;
use tokio::io::{Interest, unix::AsyncFd};

pub struct JsonLines {
    out: BufWriter<Stdout>,
}

impl JsonLines {
    pub fn stdout() -> Self {
        JsonLines {
            out: BufWriter::with_capacity(256 * 1024, io::stdout()),
        }
    }

    pub fn emit<T: Serialize>(&mut self, record: &T) -> io::Result<()> {
        serde_json::to_writer(&mut self.out, record)?;
        self.out.write_all(b"\n")
    }

    pub fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

/// A reader that went away (`| head`) is a normal end, not an error.
pub fn is_closed_pipe(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::BrokenPipe
}

/// Watches stdout for its reader going away, so that `observer run | head -n 1`
/// ends when `head` does, not at the next event. `None` when stdout cannot be
/// polled (a regular file, which has no reader to lose).
pub fn stdout_closed_watch() -> Option<AsyncFd<OwnedFd>> {
    let fd = io::stdout().as_fd().try_clone_to_owned().ok()?;
    // SAFETY: the AsyncFd owns this duplicate, which stays open until it is dropped.
    unsafe { AsyncFd::register_with_interest(fd, Interest::ERROR) }.ok()
}

/// Resolves when the reader of stdout has gone (EPOLLERR on a pipe or socket).
pub async fn stdout_closed(watch: &Option<AsyncFd<OwnedFd>>) {
    match watch {
        Some(fd) => {
            let _ = fd.ready(Interest::ERROR).await;
        }
        None => std::future::pending().await,
    }
}
