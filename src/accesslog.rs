//! The access log: one JSON object a line, buffered per worker and written by its own thread,
//! so a slow disk or pipe never stalls a request.
//!
//! Workers append lines to a local buffer ([`LocalLog`]) and hand full buffers (or every 200 ms)
//! to the writer thread over a bounded channel. When the writer falls behind, buffers are
//! dropped and counted rather than blocking a worker.

use crossbeam_channel::{bounded, Receiver, Sender, TrySendError};
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Buffers a worker hands over once they hold this much.
const FLUSH_AT: usize = 32 * 1024;

/// The writer side shared by all workers.
#[derive(Clone)]
pub struct AccessLog {
    tx: Sender<Vec<u8>>,
    /// Lines lost because the writer could not keep up.
    pub dropped: Arc<AtomicU64>,
}

impl AccessLog {
    /// Opens the log (`None` = stdout) and starts the writer thread.
    pub fn open(path: Option<&Path>) -> std::io::Result<AccessLog> {
        let mut out: Box<dyn Write + Send> = match path {
            None => Box::new(std::io::stdout()),
            Some(p) => Box::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)?,
            ),
        };
        let (tx, rx): (Sender<Vec<u8>>, Receiver<Vec<u8>>) = bounded(256);
        std::thread::Builder::new()
            .name("ringgate-log".into())
            .spawn(move || {
                for buf in rx.iter() {
                    let _ = out.write_all(&buf);
                    if rx.is_empty() {
                        let _ = out.flush();
                    }
                }
                let _ = out.flush();
            })?;
        Ok(AccessLog {
            tx,
            dropped: Arc::new(AtomicU64::new(0)),
        })
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
        if let Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) =
            self.sink.tx.try_send(full)
        {
            self.sink.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Appends `s` to `out` as the inside of a JSON string.
pub fn push_json_str(out: &mut Vec<u8>, s: &[u8]) {
    for &c in s {
        match c {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            0x00..=0x1f | 0x7f..=0xff => {
                const HEX: &[u8; 16] = b"0123456789abcdef";
                out.extend_from_slice(b"\\u00");
                out.push(HEX[(c >> 4) as usize]);
                out.push(HEX[(c & 15) as usize]);
            }
            _ => out.push(c),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_escaping() {
        let mut o = Vec::new();
        push_json_str(&mut o, b"a\"b\\c\n\xff");
        assert_eq!(o, br#"a\"b\\c\u000a\u00ff"#);
    }
}
