//! The output: JSON Lines (schema v1) or aligned text, to stdout or to a file
//! that SIGHUP reopens (logrotate); one buffered writer, flushed once per batch.

use std::{
    fs::{File, OpenOptions},
    io::{self, BufWriter, Write},
    os::{
        fd::{AsFd, OwnedFd},
        unix::fs::OpenOptionsExt,
    },
    path::PathBuf,
};

use serde::Serialize;
use tokio::io::{Interest, unix::AsyncFd};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// One JSON object per line (schema v1).
    Json,
    /// One aligned line per event, for people.
    Text,
}

pub struct Output {
    w: BufWriter<Box<dyn Write + Send>>,
    path: Option<PathBuf>,
    format: Format,
    header_done: bool,
}

const BUF: usize = 256 * 1024;

fn open_append(path: &PathBuf) -> io::Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o640)
        .open(path)
}

impl Output {
    pub fn new(path: Option<PathBuf>, format: Format) -> io::Result<Output> {
        let w: Box<dyn Write + Send> = match &path {
            Some(p) => Box::new(open_append(p)?),
            None => Box::new(io::stdout()),
        };
        Ok(Output {
            w: BufWriter::with_capacity(BUF, w),
            path,
            format,
            header_done: false,
        })
    }

    pub fn is_stdout(&self) -> bool {
        self.path.is_none()
    }

    /// After logrotate moved the file away: write to a new one at the same path.
    pub fn reopen(&mut self) -> io::Result<()> {
        if let Some(p) = &self.path {
            self.w.flush()?;
            self.w = BufWriter::with_capacity(BUF, Box::new(open_append(p)?));
        }
        Ok(())
    }

    pub fn emit<T: Serialize>(&mut self, record: &T) -> io::Result<()> {
        match self.format {
            Format::Json => {
                serde_json::to_writer(&mut self.w, record)?;
                self.w.write_all(b"\n")
            }
            Format::Text => {
                if !self.header_done {
                    self.header_done = true;
                    writeln!(self.w, "{}", crate::text::HEADER)?;
                }
                let v = serde_json::to_value(record)?;
                self.w.write_all(crate::text::line(&v).as_bytes())
            }
        }
    }

    pub fn flush(&mut self) -> io::Result<()> {
        self.w.flush()
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
