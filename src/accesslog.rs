//! The access log: one JSON object a line, buffered per worker and written by its own thread,
//! so a slow disk or pipe never stalls a request.
//!
//! Workers append lines to a local buffer ([`LocalLog`]) and hand full buffers (or every 200 ms)
//! to the writer thread over a bounded channel. When the writer falls behind, buffers are
//! dropped and their lines counted rather than blocking a worker; lines the writer fails to
//! write are counted too ([`AccessLog::dropped`], the `ringgate_access_log_dropped_total`
//! metric), with one stderr line at most every [`REPORT_EVERY`].
//!
//! [`AccessLog::reopen`] (SIGUSR1) makes the writer open the file again at its path, so a log
//! rotated with `mv` goes on in a new file.

use crossbeam_channel::{bounded, Receiver, RecvTimeoutError, Sender, TrySendError};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Buffers a worker hands over once they hold this much.
const FLUSH_AT: usize = 32 * 1024;

/// How long [`AccessLog::finish`] waits for the writer.
pub const FINISH_WAIT: Duration = Duration::from_secs(2);

/// At most one stderr line about failed writes this often.
pub const REPORT_EVERY: Duration = Duration::from_secs(10);

/// The writer side shared by all workers.
#[derive(Clone)]
pub struct AccessLog {
    tx: Sender<Vec<u8>>,
    /// Lines lost because the writer could not keep up or could not write them.
    pub dropped: Arc<AtomicU64>,
    /// Set by [`AccessLog::reopen`]; the writer thread clears it.
    reopen: Arc<AtomicBool>,
    /// Set by [`AccessLog::finish`]: the writer writes what it was handed and exits.
    finishing: Arc<AtomicBool>,
    /// The writer thread, joined by [`AccessLog::finish`].
    thread: Arc<std::sync::Mutex<Option<std::thread::JoinHandle<()>>>>,
}

/// Opens `path` for appending (created when missing).
fn open_file(path: &Path) -> std::io::Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
}

/// Number of lines in `buf`.
fn lines(buf: &[u8]) -> u64 {
    buf.iter().filter(|&&b| b == b'\n').count() as u64
}

impl AccessLog {
    /// Opens the log (`None` = stdout) and starts the writer thread. The error names the file.
    pub fn open(path: Option<&Path>) -> Result<AccessLog, String> {
        let out: Box<dyn Write + Send> = match path {
            None => Box::new(std::io::stdout()),
            Some(p) => Box::new(
                open_file(p).map_err(|e| format!("cannot open access log {}: {e}", p.display()))?,
            ),
        };
        let (tx, rx): (Sender<Vec<u8>>, Receiver<Vec<u8>>) = bounded(256);
        let dropped = Arc::new(AtomicU64::new(0));
        let reopen = Arc::new(AtomicBool::new(false));
        let finishing = Arc::new(AtomicBool::new(false));
        let mut writer = Writer {
            out,
            path: path.map(Path::to_path_buf),
            dropped: dropped.clone(),
            reopen: reopen.clone(),
            finishing: finishing.clone(),
            failed: 0,
            last_error: None,
            last_report: None,
        };
        let thread = std::thread::Builder::new()
            .name("ringgate-log".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| format!("cannot start the access log writer: {e}"))?;
        Ok(AccessLog {
            tx,
            dropped,
            reopen,
            finishing,
            thread: Arc::new(std::sync::Mutex::new(Some(thread))),
        })
    }

    /// Writes every line handed over so far, closes the file and stops the writer thread;
    /// returns when it is done (the gateway stops, after its workers), or after
    /// [`FINISH_WAIT`] when the output blocks (stdout into a pipe nobody reads): the writer
    /// is then left to finish on its own. Lines handed over later are counted as dropped.
    pub fn finish(&self) {
        let thread = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take();
        let Some(thread) = thread else { return };
        self.finishing.store(true, Ordering::Release);
        let until = Instant::now() + FINISH_WAIT;
        // Queued behind the lines already handed over.
        let _ = self.tx.send_timeout(Vec::new(), FINISH_WAIT);
        while !thread.is_finished() && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(2));
        }
        if thread.is_finished() {
            let _ = thread.join();
        } else {
            crate::elog!("ringgate: the access log writer is blocked; not waiting for it");
        }
    }

    /// Asks the writer to open the file again at its path (SIGUSR1, after a rotation); lines
    /// handed over from then on go to the new file. A file that cannot be opened is reported
    /// on stderr and the old one is kept. No-op for stdout.
    pub fn reopen(&self) {
        self.reopen.store(true, Ordering::Release);
        // Wakes the writer at once; when the channel is full it is busy anyway and sees the
        // flag after the current buffer.
        let _ = self.tx.try_send(Vec::new());
    }
}

/// The writer thread's state.
struct Writer {
    out: Box<dyn Write + Send>,
    /// `None` = stdout.
    path: Option<PathBuf>,
    dropped: Arc<AtomicU64>,
    reopen: Arc<AtomicBool>,
    finishing: Arc<AtomicBool>,
    /// Lines that failed since the last report.
    failed: u64,
    last_error: Option<std::io::Error>,
    last_report: Option<Instant>,
}

impl Writer {
    fn run(&mut self, rx: Receiver<Vec<u8>>) {
        loop {
            match rx.recv_timeout(Duration::from_millis(200)) {
                Ok(buf) => {
                    self.check_reopen();
                    if !buf.is_empty() {
                        self.write(&buf);
                    }
                    if rx.is_empty() {
                        if let Err(e) = self.out.flush() {
                            self.last_error = Some(e);
                        }
                    }
                }
                Err(RecvTimeoutError::Timeout) => self.check_reopen(),
                Err(RecvTimeoutError::Disconnected) => break,
            }
            self.report();
            if self.finishing.load(Ordering::Acquire) {
                // Whatever else was queued, then stop (the receiver's drop refuses the rest).
                for buf in rx.try_iter() {
                    self.write(&buf);
                }
                break;
            }
        }
        let _ = self.out.flush();
        self.last_report = None;
        self.report();
    }

    fn write(&mut self, buf: &[u8]) {
        if let Err(e) = self.out.write_all(buf) {
            let n = lines(buf);
            self.dropped.fetch_add(n, Ordering::Relaxed);
            self.failed += n;
            self.last_error = Some(e);
        }
    }

    fn check_reopen(&mut self) {
        if !self.reopen.swap(false, Ordering::AcqRel) {
            return;
        }
        let Some(path) = &self.path else { return };
        let _ = self.out.flush();
        match open_file(path) {
            Ok(f) => {
                self.out = Box::new(f);
                crate::elog!("ringgate: access log reopened: {}", path.display());
            }
            Err(e) => crate::elog!(
                "ringgate: cannot reopen access log {}: {e} (writing on to the old file)",
                path.display()
            ),
        }
    }

    /// One stderr line about failed writes, at most every [`REPORT_EVERY`].
    fn report(&mut self) {
        let Some(e) = &self.last_error else { return };
        if self.last_report.is_some_and(|t| t.elapsed() < REPORT_EVERY) {
            return;
        }
        let target = match &self.path {
            Some(p) => p.display().to_string(),
            None => "stdout".to_string(),
        };
        crate::elog!(
            "ringgate: cannot write access log {target}: {e} ({} line(s) dropped since the last report)",
            self.failed
        );
        self.failed = 0;
        self.last_error = None;
        self.last_report = Some(Instant::now());
    }
}

/// A worker's line buffer.
pub struct LocalLog {
    sink: AccessLog,
    buf: Vec<u8>,
}

impl LocalLog {
    /// A buffer feeding `sink`.
    pub fn new(sink: AccessLog) -> Self {
        LocalLog {
            sink,
            buf: Vec::with_capacity(FLUSH_AT + 1024),
        }
    }

    /// The buffer to append one line to; call [`LocalLog::line_done`] after.
    pub fn buf(&mut self) -> &mut Vec<u8> {
        &mut self.buf
    }

    /// Hands the buffer over once it is full.
    pub fn line_done(&mut self) {
        if self.buf.len() >= FLUSH_AT {
            self.flush();
        }
    }

    /// Hands whatever is buffered to the writer.
    pub fn flush(&mut self) {
        if self.buf.is_empty() {
            return;
        }
        let full = std::mem::replace(&mut self.buf, Vec::with_capacity(FLUSH_AT + 1024));
        if let Err(TrySendError::Full(b) | TrySendError::Disconnected(b)) =
            self.sink.tx.try_send(full)
        {
            self.sink.dropped.fetch_add(lines(&b), Ordering::Relaxed);
        }
    }
}

/// Appends `s` to `out` as the inside of a JSON string: UTF-8 text as it is (`"`, backslash and
/// control characters escaped); a byte that is not part of valid UTF-8 as `\u00XX`, so the
/// line stays valid JSON.
pub fn push_json_str(out: &mut Vec<u8>, s: &[u8]) {
    for chunk in s.utf8_chunks() {
        for &c in chunk.valid().as_bytes() {
            match c {
                b'"' => out.extend_from_slice(b"\\\""),
                b'\\' => out.extend_from_slice(b"\\\\"),
                0x00..=0x1f | 0x7f => push_u00(out, c),
                _ => out.push(c),
            }
        }
        for &c in chunk.invalid() {
            push_u00(out, c);
        }
    }
}

fn push_u00(out: &mut Vec<u8>, c: u8) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.extend_from_slice(b"\\u00");
    out.push(HEX[(c >> 4) as usize]);
    out.push(HEX[(c & 15) as usize]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_escaping() {
        let mut o = Vec::new();
        push_json_str(&mut o, b"a\"b\\c\n\xff");
        assert_eq!(o, br#"a\"b\\c\u000a\u00ff"#);
        // UTF-8 text stays as it is (no mojibake); a stray byte in it is escaped.
        o.clear();
        push_json_str(&mut o, "caf\u{e9} \u{2603}\x7f".as_bytes());
        assert_eq!(o, "caf\u{e9} \u{2603}\\u007f".as_bytes());
        o.clear();
        push_json_str(&mut o, b"a\xc3b\xe2\x98\x83");
        assert_eq!(o, "a\\u00c3b\u{2603}".as_bytes());
        assert!(serde_json::from_slice::<String>(&[b"\"", &o[..], b"\""].concat()).is_ok());
    }
}
