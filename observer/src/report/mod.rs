//! `observer report [FILE…|-] [--html FILE] [--top N]`: what an on-call
//! person asks first of a stream — failures by errno, port, process and
//! rule, the busiest binders, TIME_WAIT per port, over time and per port over
//! time, what was lost, and the time span — in one pass over the JSON Lines,
//! with memory bounded by the distinct ports, processes and rules, not by the
//! records (the per-port series: by a fixed number of ports and bins).

pub mod aggregate;
mod html;
mod text;
mod time;

use std::{
    fs::File,
    io::{self, Read, Write},
    path::PathBuf,
    process::ExitCode,
};

pub use aggregate::Report;
use anyhow::Context;

#[derive(clap::Args, Debug)]
pub struct ReportArgs {
    /// JSON Lines written by `observer run`; several (rotated files, oldest first)
    /// are read in the order given; `-` or none: stdin.
    #[arg(value_name = "FILE")]
    pub files: Vec<PathBuf>,

    /// Also write the report to FILE as one self-contained HTML page (tables,
    /// a time chart and one of TIME_WAIT open per port, in inline SVG; nothing fetched).
    #[arg(long, value_name = "FILE")]
    pub html: Option<PathBuf>,

    /// Rows in the tables of ports and processes.
    #[arg(long, value_name = "N", default_value_t = 10,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub top: u32,
}

/// Lines are read in chunks of this size (a longer line grows the buffer, up to `MAX_LINE`).
const CHUNK: usize = 1 << 20;
/// A "line" longer than this is not a record: it is skipped to its end and counted.
const MAX_LINE: usize = 64 << 20;

pub fn run(args: ReportArgs) -> ExitCode {
    match report(&args) {
        Ok(()) => ExitCode::SUCCESS,
        // `observer report … | head`: the reader has what it wanted.
        Err(e)
            if e.downcast_ref::<io::Error>()
                .is_some_and(|e| e.kind() == io::ErrorKind::BrokenPipe) =>
        {
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("observer: report: {e:#}");
            ExitCode::FAILURE
        }
    }
}

enum Input {
    Stdin,
    File(String, File),
}

fn report(args: &ReportArgs) -> anyhow::Result<()> {
    // Every input and the page's path are checked before anything is read.
    let mut inputs = Vec::new();
    for p in &args.files {
        if p.as_os_str() == "-" {
            inputs.push(Input::Stdin);
            continue;
        }
        let shown = p.display().to_string();
        let f = File::open(p).with_context(|| shown.clone())?;
        if f.metadata().with_context(|| shown.clone())?.is_dir() {
            anyhow::bail!("{shown}: is a directory");
        }
        inputs.push(Input::File(shown, f));
    }
    if inputs.is_empty() {
        inputs.push(Input::Stdin);
    }
    let page = match &args.html {
        Some(p) => {
            // Emptying the page must not empty a stream it is made of.
            use std::os::unix::fs::MetadataExt;
            if let Ok(m) = std::fs::metadata(p) {
                let same = |f: &File| {
                    f.metadata()
                        .is_ok_and(|i| (i.dev(), i.ino()) == (m.dev(), m.ino()))
                };
                if inputs
                    .iter()
                    .any(|i| matches!(i, Input::File(_, f) if same(f)))
                {
                    anyhow::bail!("--html {}: is one of the files to read", p.display());
                }
            }
            Some(crate::output::open_truncate(p, "--html")?)
        }
        None => None,
    };
    let names: Vec<String> = inputs
        .iter()
        .map(|i| match i {
            Input::Stdin => "stdin".to_owned(),
            Input::File(name, _) => name.clone(),
        })
        .collect();

    let mut r = Report::default();
    let mut reader = LineReader::default();
    for input in inputs {
        match input {
            Input::Stdin => reader.feed(&mut io::stdin().lock(), &mut r),
            Input::File(name, mut f) => reader
                .feed(&mut f, &mut r)
                .with_context(|| format!("reading {name}")),
        }?;
    }

    let (tables, chart) = text::tables(&mut r, &names, args.top as usize);
    if let (Some(mut page), Some(path)) = (page, &args.html) {
        page.write_all(html::render(&tables, &chart, r.first, r.last).as_bytes())
            .and_then(|()| page.sync_all())
            .with_context(|| format!("--html {}", path.display()))?;
    }
    let mut out = io::stdout().lock();
    out.write_all(text::render(&tables).as_bytes())?;
    out.flush()?;
    Ok(())
}

/// Splits what it reads into lines without copying them: a chunk is read,
/// its whole lines are handed on, the partial last one moves to the front.
#[derive(Default)]
struct LineReader {
    buf: Vec<u8>,
}

impl LineReader {
    fn feed(&mut self, input: &mut dyn Read, r: &mut Report) -> anyhow::Result<()> {
        if self.buf.len() < CHUNK {
            self.buf.resize(CHUNK, 0);
        }
        let mut filled = 0;
        // Inside an overlong line: skip to its end.
        let mut skipping = false;
        loop {
            if filled == self.buf.len() {
                if self.buf.len() < MAX_LINE {
                    let n = self.buf.len() * 2;
                    self.buf.resize(n, 0);
                } else {
                    // No newline in MAX_LINE bytes: not a record.
                    if !skipping {
                        r.lines += 1;
                        r.not_records += 1;
                    }
                    skipping = true;
                    filled = 0;
                }
            }
            let n = match input.read(&mut self.buf[filled..]) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e.into()),
            };
            let end = filled + n;
            let mut start = 0;
            // Only the new bytes can hold the first newline not yet seen.
            let mut from = filled;
            while let Some(i) = memchr::memchr(b'\n', &self.buf[from..end]) {
                let nl = from + i;
                if skipping {
                    skipping = false;
                } else {
                    r.line(&self.buf[start..nl]);
                }
                start = nl + 1;
                from = start;
            }
            self.buf.copy_within(start..end, 0);
            filled = end - start;
        }
        // The last line of a file without its newline (a file still being written).
        if filled > 0 && !skipping {
            r.line(&self.buf[..filled]);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
