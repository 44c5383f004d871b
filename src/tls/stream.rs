//! A server-side TLS stream over a monoio [`TcpStream`]: rustls does the protocol, this type
//! moves its records through owned-buffer (io_uring style) reads and writes.
//!
//! Why not `monoio-rustls`: its buffers are taken out of the stream for the length of each
//! socket operation and only put back when the operation completes, so a read or write future
//! dropped half way (every timeout in the connection loop drops one) leaves the stream without
//! its buffer, and the next call on it panics, which in a `panic = "abort"` build ends the
//! whole gateway. It also has no cancelable read (the idle grace and the WebSocket buffer
//! release cancel reads) and holds 32 KiB of fixed buffers per connection, idle or not.
//!
//! Here a dropped read makes later reads fail and a dropped write makes later writes fail
//! (their bytes may be lost or half sent), and nothing panics. Buffers are plain `Vec`s,
//! allocated when bytes move and dropped when the connection is parked.
//!
//! Reads never write: with the stream split into halves (WebSocket) the read half and the write
//! half share it, and only the write half puts bytes on the socket. Whatever rustls wants to
//! send after a read (a key update, session tickets) goes out with the next write.

use monoio::buf::{IoBuf, IoBufMut, IoVecBuf, IoVecBufMut, RawBuf};
use monoio::io::{
    AsyncReadRent, AsyncWriteRent, AsyncWriteRentExt, CancelHandle, CancelableAsyncReadRent, Split,
};
use monoio::net::TcpStream;
use monoio::BufResult;
use rustls::ServerConnection;
use std::io::{self, Read, Write};
use std::sync::Arc;

/// Size of a socket read: one full TLS record and its overhead.
const READ_SIZE: usize = 16 * 1024 + 512;
/// A write buffer larger than this is not kept between writes.
const KEEP_WRITE: usize = 64 * 1024 + 4096;

/// A TLS connection accepted by the gateway.
pub struct TlsStream {
    io: TcpStream,
    conn: ServerConnection,
    /// Ciphertext read from the socket and not yet handed to rustls: `rbuf[rpos..]`.
    rbuf: Vec<u8>,
    rpos: usize,
    /// Decrypted bytes waiting in rustls.
    plain: usize,
    /// The peer sent close_notify or closed its socket.
    closed: bool,
    /// Ciphertext on its way to the socket (kept for reuse).
    wbuf: Vec<u8>,
    /// A read was dropped half way (its bytes may be lost) or rustls refused what came in:
    /// reads fail from now on.
    rbroken: bool,
    /// A write was dropped half way or failed (part of a record may be on the wire): writes
    /// fail from now on.
    wbroken: bool,
    /// `x-forwarded-client-cert` value ([`super::xfcc`]) when the client presented a
    /// certificate (mTLS); set once the handshake is done.
    xfcc: Option<Box<[u8]>>,
}

// SAFETY: the halves of a split stream share it through monoio's `Rc<UnsafeCell>`, as monoio
// does for its own `TcpStream`. A read only holds the socket (and a buffer it moved out of the
// stream) across an await, and a write the same; rustls' state is touched only between awaits,
// never by both halves at once on this single-threaded runtime.
unsafe impl Split for TlsStream {}

fn broken(what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::BrokenPipe,
        format!("tls stream unusable after an interrupted {what}"),
    )
}

impl TlsStream {
    /// Ends an idle connection without waiting: queues close_notify and hands it to the
    /// socket in one non-blocking send (an idle connection's send buffer is empty, so the
    /// alert fits), then closes the socket. For parked connections closed at their deadline
    /// or at shutdown, outside any task; a client that reads on is told the end was meant.
    pub fn close_now(mut self) {
        if self.wbroken {
            return;
        }
        self.conn.send_close_notify();
        let mut out = Vec::new();
        while self.conn.wants_write() {
            if self.conn.write_tls(&mut out).is_err() {
                return;
            }
        }
        use std::os::fd::AsRawFd;
        // SAFETY: `out` is valid for `out.len()` bytes during the call; the descriptor is
        // this stream's open socket. MSG_DONTWAIT: never blocks; MSG_NOSIGNAL: no SIGPIPE
        // from a peer that is gone. What is not sent is lost, as with any close.
        unsafe {
            libc::send(
                self.io.as_raw_fd(),
                out.as_ptr().cast(),
                out.len(),
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            );
        }
    }

    fn new(io: TcpStream, conn: ServerConnection) -> TlsStream {
        TlsStream {
            io,
            conn,
            rbuf: Vec::new(),
            rpos: 0,
            plain: 0,
            closed: false,
            wbuf: Vec::new(),
            rbroken: false,
            wbroken: false,
            xfcc: None,
        }
    }

    /// The `x-forwarded-client-cert` value for the verified client certificate (mTLS).
    pub fn xfcc(&self) -> Option<&[u8]> {
        self.xfcc.as_deref()
    }

    /// The TCP socket underneath.
    pub fn tcp(&self) -> &TcpStream {
        &self.io
    }

    /// The rustls connection (SNI, negotiated version, peer certificates).
    pub fn session(&self) -> &ServerConnection {
        &self.conn
    }

    /// Drops the socket buffers of an idle connection. Only rustls' own state stays: any
    /// partial record it holds completes when more bytes arrive, which wakes the parked socket.
    pub fn release_buffers(&mut self) {
        if self.rpos >= self.rbuf.len() {
            self.rbuf = Vec::new();
            self.rpos = 0;
        }
        self.wbuf = Vec::new();
    }

    /// Whether nothing is buffered above the socket: no plaintext in rustls and no ciphertext
    /// waiting to be handed to it. Only then may the connection wait on socket readiness.
    pub fn drained(&self) -> bool {
        self.plain == 0 && self.rpos >= self.rbuf.len()
    }

    /// Hands buffered ciphertext to rustls until it yields plaintext or none is left.
    fn feed(&mut self) -> io::Result<()> {
        while self.rpos < self.rbuf.len() {
            let mut rd = &self.rbuf[self.rpos..];
            let n = match self.conn.read_tls(&mut rd) {
                Ok(n) => n,
                Err(e) => {
                    self.rbroken = true;
                    return Err(e);
                }
            };
            if n == 0 {
                // rustls took nothing while bytes wait: never loop on it.
                self.rbroken = true;
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "tls: stalled input",
                ));
            }
            self.rpos += n;
            let st = match self.conn.process_new_packets() {
                Ok(st) => st,
                Err(e) => {
                    self.rbroken = true;
                    return Err(io::Error::new(io::ErrorKind::InvalidData, e));
                }
            };
            self.plain = st.plaintext_bytes_to_read();
            if st.peer_has_closed() {
                self.closed = true;
            }
            if self.plain > 0 {
                break;
            }
        }
        if self.rpos >= self.rbuf.len() {
            self.rbuf.clear();
            self.rpos = 0;
        }
        Ok(())
    }

    /// One socket read into `rbuf`; `Ok(false)` at end of stream.
    async fn read_socket(&mut self, cancel: Option<&CancelHandle>) -> io::Result<bool> {
        let mut b = std::mem::take(&mut self.rbuf);
        b.clear();
        if b.capacity() < READ_SIZE {
            b.reserve(READ_SIZE);
        }
        self.rpos = 0;
        // Cleared when the read completes: a read dropped half way may have lost bytes.
        self.rbroken = true;
        let (res, b) = match cancel {
            Some(c) => self.io.cancelable_read(b, c.clone()).await,
            None => self.io.read(b).await,
        };
        self.rbuf = b;
        match res {
            Ok(0) => {
                self.rbroken = false;
                self.closed = true;
                Ok(false)
            }
            Ok(_) => {
                self.rbroken = false;
                Ok(true)
            }
            Err(e) if e.raw_os_error() == Some(libc::ECANCELED) => {
                // Cancelled before any byte arrived: nothing was lost.
                self.rbroken = false;
                Err(e)
            }
            Err(e) => Err(e),
        }
    }

    /// Reads plaintext into `buf`.
    async fn read_plain<T: IoBufMut>(
        &mut self,
        mut buf: T,
        cancel: Option<&CancelHandle>,
    ) -> BufResult<usize, T> {
        loop {
            if self.plain > 0 {
                let n = self.plain.min(buf.bytes_total());
                if n == 0 {
                    return (Ok(0), buf);
                }
                let dst = buf.write_ptr();
                // SAFETY: `write_ptr` is valid for `bytes_total` bytes (IoBufMut's contract) and
                // n <= bytes_total. The bytes are zeroed first, so the slice never covers
                // uninitialized memory; rustls then overwrites them.
                let slice = unsafe {
                    std::ptr::write_bytes(dst, 0, n);
                    std::slice::from_raw_parts_mut(dst, n)
                };
                return match self.conn.reader().read(slice) {
                    Ok(got) => {
                        self.plain -= got.min(self.plain);
                        // SAFETY: rustls wrote `got` (<= n) bytes at the start of the buffer.
                        unsafe { buf.set_init(got) };
                        (Ok(got), buf)
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        self.plain = 0;
                        continue;
                    }
                    Err(e) => (Err(e), buf),
                };
            }
            if self.rbroken {
                return (Err(broken("read")), buf);
            }
            if self.rpos < self.rbuf.len() {
                if let Err(e) = self.feed() {
                    return (Err(e), buf);
                }
                continue;
            }
            if self.closed {
                // close_notify, or the socket closed: end of stream either way (HTTP messages
                // carry their own length, so a truncation is seen by the reader).
                return (Ok(0), buf);
            }
            match self.read_socket(cancel).await {
                Ok(true) => {
                    if let Err(e) = self.feed() {
                        return (Err(e), buf);
                    }
                }
                Ok(false) => return (Ok(0), buf),
                Err(e) => return (Err(e), buf),
            }
        }
    }

    /// Writes everything rustls has to send.
    async fn flush_tls(&mut self) -> io::Result<()> {
        if self.wbroken {
            return Err(broken("write"));
        }
        while self.conn.wants_write() {
            let mut out = std::mem::take(&mut self.wbuf);
            out.clear();
            while self.conn.wants_write() {
                if let Err(e) = self.conn.write_tls(&mut out) {
                    self.wbroken = true;
                    return Err(e);
                }
            }
            // Cleared when the write completes: one dropped half way may have sent part of a
            // record.
            self.wbroken = true;
            let (res, out) = self.io.write_all(out).await;
            if out.capacity() <= KEEP_WRITE {
                self.wbuf = out;
            }
            res?;
            self.wbroken = false;
        }
        Ok(())
    }

    /// Hands `data` to rustls (as much as its buffer takes) and sends the records.
    async fn write_plain(&mut self, data: &[&[u8]]) -> io::Result<usize> {
        if self.wbroken {
            return Err(broken("write"));
        }
        // Records rustls queued on its own (tickets, a key update) go first.
        if self.conn.wants_write() {
            self.flush_tls().await?;
        }
        let mut n = 0;
        for d in data {
            if d.is_empty() {
                continue;
            }
            let k = self.conn.writer().write(d)?;
            n += k;
            if k < d.len() {
                break;
            }
        }
        self.flush_tls().await?;
        Ok(n)
    }
}

/// Runs the server side of a TLS handshake on an accepted socket. The caller bounds it in
/// time (dropping the future closes the socket). A refused handshake sends rustls' alert.
pub async fn accept(io: TcpStream, cfg: Arc<rustls::ServerConfig>) -> io::Result<TlsStream> {
    let conn = ServerConnection::new(cfg).map_err(io::Error::other)?;
    let mut s = TlsStream::new(io, conn);
    while s.conn.is_handshaking() {
        if s.conn.wants_write() {
            s.flush_tls().await?;
            continue;
        }
        if s.rpos >= s.rbuf.len() && !s.read_socket(None).await? {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "client closed during the TLS handshake",
            ));
        }
        if let Err(e) = s.feed() {
            // Not TLS (plain HTTP on this port), or refused (no or bad client certificate):
            // tell the client why when it can hear it, then close.
            let _ = s.flush_tls().await;
            return Err(e);
        }
        if s.closed && s.conn.is_handshaking() {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "client closed during the TLS handshake",
            ));
        }
    }
    s.flush_tls().await?;
    s.xfcc = s
        .conn
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|der| super::xfcc(der.as_ref()).into_boxed_slice());
    Ok(s)
}

impl AsyncReadRent for TlsStream {
    async fn read<T: IoBufMut>(&mut self, buf: T) -> BufResult<usize, T> {
        self.read_plain(buf, None).await
    }

    async fn readv<T: IoVecBufMut>(&mut self, mut buf: T) -> BufResult<usize, T> {
        // SAFETY: the raw buffer covers the first iovec of `buf`, which outlives this call.
        let res = match unsafe { RawBuf::new_from_iovec_mut(&mut buf) } {
            Some(raw) => self.read_plain(raw, None).await.0,
            None => Ok(0),
        };
        if let Ok(n) = res {
            // SAFETY: `n` bytes were written at the start of the first iovec.
            unsafe { buf.set_init(n) };
        }
        (res, buf)
    }
}

impl CancelableAsyncReadRent for TlsStream {
    async fn cancelable_read<T: IoBufMut>(
        &mut self,
        buf: T,
        c: CancelHandle,
    ) -> BufResult<usize, T> {
        self.read_plain(buf, Some(&c)).await
    }

    async fn cancelable_readv<T: IoVecBufMut>(
        &mut self,
        mut buf: T,
        c: CancelHandle,
    ) -> BufResult<usize, T> {
        // SAFETY: as in `readv`.
        let res = match unsafe { RawBuf::new_from_iovec_mut(&mut buf) } {
            Some(raw) => self.read_plain(raw, Some(&c)).await.0,
            None => Ok(0),
        };
        if let Ok(n) = res {
            // SAFETY: as in `readv`.
            unsafe { buf.set_init(n) };
        }
        (res, buf)
    }
}

impl AsyncWriteRent for TlsStream {
    async fn write<T: IoBuf>(&mut self, buf: T) -> BufResult<usize, T> {
        // SAFETY: `read_ptr` is valid for `bytes_init` initialized bytes while we hold `buf`.
        let data = unsafe { std::slice::from_raw_parts(buf.read_ptr(), buf.bytes_init()) };
        let res = self.write_plain(&[data]).await;
        (res, buf)
    }

    async fn writev<T: IoVecBuf>(&mut self, buf: T) -> BufResult<usize, T> {
        let (ptr, len) = (buf.read_iovec_ptr(), buf.read_iovec_len());
        // SAFETY: IoVecBuf's contract: `ptr` points at `len` valid iovecs whose memory stays
        // valid and unchanged while we hold `buf`.
        let iovs = unsafe { std::slice::from_raw_parts(ptr, len) };
        let mut parts: [&[u8]; 8] = [&[]; 8];
        let mut k = 0;
        for v in iovs.iter().take(parts.len()) {
            if v.iov_len > 0 {
                // SAFETY: each iovec describes `iov_len` initialized bytes (see above).
                parts[k] =
                    unsafe { std::slice::from_raw_parts(v.iov_base as *const u8, v.iov_len) };
                k += 1;
            }
        }
        let res = self.write_plain(&parts[..k]).await;
        (res, buf)
    }

    async fn flush(&mut self) -> io::Result<()> {
        self.flush_tls().await
    }

    async fn shutdown(&mut self) -> io::Result<()> {
        // (`close_now` below is the same without waiting, for parked connections.)
        if !self.wbroken {
            self.conn.send_close_notify();
            let _ = self.flush_tls().await;
        }
        self.io.shutdown().await
    }
}
