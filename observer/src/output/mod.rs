//! The output: JSON Lines (schema v1) or aligned text, to stdout or to a file
//! that SIGHUP reopens (logrotate). The event loop renders records into
//! batches of whole lines; a writer thread of its own writes them (`writer`),
//! so that a stalled or failing output never stops the loop.

mod json;
mod open;
mod writer;

use std::{
    io,
    os::fd::{AsFd, OwnedFd},
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
        mpsc::{Sender, channel},
    },
    time::{Duration, Instant},
};

pub use open::{OpenError, open_truncate};
use tokio::io::{Interest, unix::AsyncFd};
use writer::{Msg, Shared, Target, Writer};

use crate::{clock::Clock, schema::Line};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// One JSON object per line (schema v1).
    Json,
    /// One aligned line per event, for people.
    Text,
}

/// A batch is handed to the writer when it reaches this size (else at the end
/// of each drain): a burst must not make one batch larger than the queue.
const BATCH_BYTES: usize = 256 << 10;

/// Bytes handed to the writer and not yet written, at most: beyond it (the
/// reader stalls, the disk hangs) records are dropped and counted, so that the
/// daemon's memory does not follow a stuck output.
const MAX_QUEUED: usize = 16 << 20;

/// The event loop's side of the output: renders records into a batch of
/// whole lines and hands each batch to the writer thread. Never blocks.
pub struct Output {
    format: Format,
    header_done: bool,
    batch: Vec<u8>,
    batch_lines: u64,
    /// Lines rendered so far (written, queued or lost).
    rendered: u64,
    tx: Option<Sender<Msg>>,
    shared: Arc<Shared>,
    written: Arc<AtomicU64>,
    is_stdout: bool,
    last_explain: json::LastExplain,
}

/// One record as one line of `format` (text lines end in a newline too).
pub fn render(format: Format, record: &Line) -> Vec<u8> {
    match format {
        Format::Json => {
            let mut line = serde_json::to_vec(record).expect("records serialize");
            line.push(b'\n');
            line
        }
        Format::Text => crate::text::line(record).into_bytes(),
    }
}

impl Output {
    /// Stdout, or `path` opened safely (see `open`); starts the writer thread.
    pub fn open(path: Option<&Path>, format: Format, clock: Clock) -> Result<Output, OpenError> {
        let target = match path {
            None => Target::stdout(),
            Some(p) => Target::File {
                path: p.to_owned(),
                file: open::open_append(p)?,
            },
        };
        let shared = Arc::new(Shared::default());
        let (tx, rx) = channel();
        let writer = Writer::new(target, format, clock, shared.clone());
        let written = writer.written.clone();
        std::thread::Builder::new()
            .name("output".into())
            .spawn(move || writer.run(rx))
            .expect("spawning the output thread");
        Ok(Output {
            format,
            header_done: false,
            batch: Vec::with_capacity(64 * 1024),
            batch_lines: 0,
            rendered: 0,
            tx: Some(tx),
            shared,
            written,
            is_stdout: path.is_none(),
            last_explain: json::LastExplain::default(),
        })
    }

    pub fn is_stdout(&self) -> bool {
        self.is_stdout
    }

    /// After logrotate moved the file away: the writer opens the path again
    /// (and keeps the old file, saying so, if it cannot).
    pub fn reopen(&mut self) {
        self.flush();
        self.send(Msg::Reopen);
    }

    /// Adds a record to the current batch.
    pub fn emit(&mut self, record: &Line) {
        if self.format == Format::Text && !self.header_done {
            self.header_done = true;
            self.batch.extend_from_slice(crate::text::HEADER.as_bytes());
            self.batch.push(b'\n');
        }
        match self.format {
            // Straight into the batch: no buffer per line to grow and copy.
            Format::Json => {
                if !json::write(&mut self.batch, &mut self.last_explain, record) {
                    serde_json::to_writer(&mut self.batch, record).expect("records serialize");
                }
                self.batch.push(b'\n');
            }
            Format::Text => self.batch.extend_from_slice(&render(self.format, record)),
        }
        self.batch_lines += 1;
        self.rendered += 1;
        if self.batch.len() >= BATCH_BYTES {
            self.flush();
        }
    }

    /// Hands the batch to the writer, or drops and counts it when the writer
    /// is that far behind.
    pub fn flush(&mut self) {
        if self.batch.is_empty() {
            return;
        }
        let bytes = std::mem::replace(&mut self.batch, Vec::with_capacity(64 * 1024));
        let lines = std::mem::take(&mut self.batch_lines);
        if self.shared.queued.load(Ordering::Relaxed) + bytes.len() > MAX_QUEUED {
            self.shared.lost.fetch_add(lines, Ordering::Relaxed);
            self.shared
                .dropped_unreported
                .fetch_add(lines, Ordering::Relaxed);
            return;
        }
        self.shared.queued.fetch_add(bytes.len(), Ordering::Relaxed);
        self.send(Msg::Lines(bytes, lines));
    }

    fn send(&mut self, msg: Msg) {
        if let Some(tx) = &self.tx {
            // The writer only hangs up when stdout's reader is gone (`closed`).
            let _ = tx.send(msg);
        }
    }

    /// Records that could not be written (or were dropped before the writer).
    pub fn lost(&self) -> u64 {
        self.shared.lost.load(Ordering::Relaxed)
    }

    /// The writer's counters, for readers on other tasks (the metrics).
    pub fn tally(&self) -> Tally {
        Tally {
            written: self.written.clone(),
            shared: self.shared.clone(),
        }
    }

    /// Stdout's reader went away: the daemon's work is done.
    pub fn closed(&self) -> bool {
        self.shared.closed.load(Ordering::Relaxed)
    }

    /// Flushes, lets the writer finish until `deadline`, and returns how many
    /// records were never written and never told by a `lost` record (the
    /// output stalled or failed to the end).
    pub fn finish(mut self, deadline: Instant) -> u64 {
        self.flush();
        drop(self.tx.take());
        while !self.shared.done.load(Ordering::Acquire) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(2));
        }
        let written = self.written.load(Ordering::Relaxed);
        let reported = self.shared.reported.load(Ordering::Relaxed);
        self.rendered.saturating_sub(written + reported)
    }
}

/// What the writer has written and lost so far, readable from anywhere.
#[derive(Clone, Default)]
pub struct Tally {
    written: Arc<AtomicU64>,
    shared: Arc<Shared>,
}

impl Tally {
    /// Lines written.
    pub fn written(&self) -> u64 {
        self.written.load(Ordering::Relaxed)
    }

    /// Lines dropped or not written (the `output` cause of `lost`).
    pub fn lost(&self) -> u64 {
        self.shared.lost.load(Ordering::Relaxed)
    }
}

impl std::fmt::Debug for Tally {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tally")
            .field("written", &self.written())
            .field("lost", &self.lost())
            .finish()
    }
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
