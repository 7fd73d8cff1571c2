//! The thread that owns the output descriptor. Writes can block (a stalled
//! pipe) or fail (a full disk); on this thread they never hold up the event
//! loop, so signals and the ring buffer are served whatever the output does.
//!
//! Guarantees: only whole lines reach the file (a write cut short by a full
//! disk is truncated back to the last complete line); every line that could
//! not be written is counted, and reported in a `lost` record (cause `output`)
//! once writing works again; a failure is said on stderr, with the path, at
//! most once a minute.

use std::{
    fs::File,
    io,
    mem::ManuallyDrop,
    os::fd::{AsRawFd, FromRawFd},
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
        mpsc::Receiver,
    },
    time::{Duration, Instant},
};

use super::{Format, open::open_append, render};
use crate::{
    clock::Clock,
    schema::{Event, Line, Lost},
};

/// At most one warning per this long about failing writes.
const WARN_EVERY: Duration = Duration::from_secs(60);

/// What the event loop sends to the writer.
pub enum Msg {
    /// Complete lines, and how many.
    Lines(Vec<u8>, u64),
    /// SIGHUP: open the file at the path again (logrotate moved it away).
    Reopen,
}

/// Counters the event loop reads.
#[derive(Default)]
pub struct Shared {
    /// Bytes sent and not yet written: the queue's bound is on this.
    pub queued: AtomicUsize,
    /// Lines dropped or not written, in all.
    pub lost: AtomicU64,
    /// Of those, the ones a `lost` record has told.
    pub reported: AtomicU64,
    /// Lines the event loop dropped (queue full) that no `lost` record has told yet.
    pub dropped_unreported: AtomicU64,
    /// The reader of stdout went away (EPIPE): the daemon ends.
    pub closed: AtomicBool,
    /// The writer has written everything it was sent and exited.
    pub done: AtomicBool,
}

pub enum Target {
    /// fd 1, never closed by us (the process's stdout).
    Stdout(ManuallyDrop<File>),
    File {
        path: PathBuf,
        file: File,
    },
}

impl Target {
    pub fn stdout() -> Target {
        // SAFETY: fd 1 stays open for the life of the process; ManuallyDrop
        // keeps this File from closing it.
        Target::Stdout(ManuallyDrop::new(unsafe { File::from_raw_fd(1) }))
    }

    fn file(&self) -> &File {
        match self {
            Target::Stdout(f) => f,
            Target::File { file, .. } => file,
        }
    }

    /// How the output is named in messages: the flag and the path.
    fn name(&self) -> String {
        match self {
            Target::Stdout(_) => "stdout".into(),
            Target::File { path, .. } => format!("--output {}", path.display()),
        }
    }
}

pub struct Writer {
    pub target: Target,
    pub format: Format,
    pub clock: Clock,
    pub shared: Arc<Shared>,
    /// Lines of batches written so far.
    pub written: Arc<AtomicU64>,
    /// Lines this thread failed to write that no `lost` record has told yet.
    unreported: u64,
    last_warn: Option<Instant>,
}

impl Writer {
    pub fn new(target: Target, format: Format, clock: Clock, shared: Arc<Shared>) -> Writer {
        Writer {
            target,
            format,
            clock,
            shared,
            written: Arc::default(),
            unreported: 0,
            last_warn: None,
        }
    }

    /// Serves `rx` until the event loop hangs up, or stdout's reader goes away.
    pub fn run(mut self, rx: Receiver<Msg>) {
        while let Ok(msg) = rx.recv() {
            match msg {
                Msg::Lines(bytes, lines) => {
                    self.shared.queued.fetch_sub(bytes.len(), Ordering::Relaxed);
                    if !self.lines(bytes, lines) {
                        self.shared.closed.store(true, Ordering::Relaxed);
                        break;
                    }
                }
                Msg::Reopen => self.reopen(),
            }
        }
        self.shared.done.store(true, Ordering::Release);
    }

    /// Writes a batch, preceded by a `lost` record when lines went missing
    /// before it. Returns false when stdout's reader is gone.
    fn lines(&mut self, batch: Vec<u8>, lines: u64) -> bool {
        let pending = self.unreported + self.shared.dropped_unreported.swap(0, Ordering::Relaxed);
        let mut buf = Vec::new();
        if pending > 0 {
            buf = render(
                self.format,
                &Line::now(
                    &self.clock,
                    Event::Lost(Lost {
                        count: pending,
                        cause: "output",
                    }),
                ),
            );
        }
        let lost_line = buf.len();
        buf.extend_from_slice(&batch);
        match write_lines(&self.target, &buf) {
            Ok(()) => {
                self.shared.reported.fetch_add(pending, Ordering::Relaxed);
                self.unreported = 0;
                self.written.fetch_add(lines, Ordering::Relaxed);
                true
            }
            Err((e, written)) => {
                if e.raw_os_error() == Some(libc::EPIPE) {
                    return false;
                }
                // Lines of the batch that made it: complete ones only.
                let batch_written = written.saturating_sub(lost_line);
                // (A text header line may be among them: never more than `lines`.)
                let kept = count_lines(&batch[..batch_written]).min(lines);
                let not_written = lines - kept;
                self.written.fetch_add(kept, Ordering::Relaxed);
                self.shared.lost.fetch_add(not_written, Ordering::Relaxed);
                if written < lost_line {
                    self.unreported = not_written + pending;
                } else {
                    self.shared.reported.fetch_add(pending, Ordering::Relaxed);
                    self.unreported = not_written;
                }
                self.warn(&format!(
                    "{e}; {} record(s) not written so far are counted and reported when writing works again",
                    self.shared.lost.load(Ordering::Relaxed)
                ));
                true
            }
        }
    }

    fn reopen(&mut self) {
        let Target::File { path, .. } = &self.target else {
            return;
        };
        match open_append(path) {
            Ok(file) => {
                let path = path.clone();
                self.target = Target::File { path, file };
                log::info!("SIGHUP: {} reopened", self.target.name());
            }
            // Keep the old descriptor: records still go somewhere an operator can find.
            Err(e) => eprintln!(
                "observer: reopening on SIGHUP failed: {e}; still writing to the file opened before; will retry at the next SIGHUP"
            ),
        }
    }

    fn warn(&mut self, what: &str) {
        if self.last_warn.is_some_and(|t| t.elapsed() < WARN_EVERY) {
            return;
        }
        self.last_warn = Some(Instant::now());
        eprintln!("observer: {}: {what}", self.target.name());
    }
}

fn count_lines(bytes: &[u8]) -> u64 {
    bytes.iter().filter(|&&b| b == b'\n').count() as u64
}

/// Writes all of `buf`; on an error, the number of bytes that stayed written.
/// For a regular file, a partial line left by the error is cut off again, so
/// a reader never sees half a record.
fn write_lines(target: &Target, buf: &[u8]) -> Result<(), (io::Error, usize)> {
    let file = target.file();
    let start = write_position(file);
    let mut done = 0;
    while done < buf.len() {
        // SAFETY: the slice is valid for its length; the descriptor is open.
        let n = unsafe {
            libc::write(
                file.as_raw_fd(),
                buf[done..].as_ptr().cast(),
                buf.len() - done,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            let whole = buf[..done]
                .iter()
                .rposition(|&b| b == b'\n')
                .map_or(0, |i| i + 1);
            if let Some(start) = start
                && whole < done
            {
                let end = start + whole as u64;
                let _ = file.set_len(end);
                // SAFETY: lseek on an open descriptor; without O_APPEND the next
                // write must start where the cut line began, not past it.
                unsafe { libc::lseek(file.as_raw_fd(), end as libc::off_t, libc::SEEK_SET) };
            }
            return Err((e, whole));
        }
        done += n as usize;
    }
    Ok(())
}

/// Where the next write lands in a regular file (its end with O_APPEND);
/// `None` for pipes and sockets, which cannot be cut back.
fn write_position(file: &File) -> Option<u64> {
    let meta = file.metadata().ok()?;
    if !meta.file_type().is_file() {
        return None;
    }
    // SAFETY: fcntl and lseek on an open descriptor.
    let flags = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETFL) };
    if flags >= 0 && flags & libc::O_APPEND != 0 {
        return Some(meta.len());
    }
    // SAFETY: as above.
    let pos = unsafe { libc::lseek(file.as_raw_fd(), 0, libc::SEEK_CUR) };
    u64::try_from(pos).ok()
}
