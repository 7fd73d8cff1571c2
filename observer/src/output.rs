//! The JSON Lines sink: one buffered writer, flushed once per batch.

use std::io::{self, BufWriter, Stdout, Write};

use serde::Serialize;

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
