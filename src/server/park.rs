//! Parking idle keep-alive connections so that they cost almost nothing.
//!
//! A connection that has waited [`super::IDLE_GRACE`] for its next request gives its buffers
//! back and its socket goes into the worker's park table and the worker's own epoll set. No
//! task, no timer and no buffer stays behind: only the table slot (32 bytes) and the kernel's
//! epoll item. A plain socket is parked as a bare descriptor: the runtime's stream record (a
//! small heap object of its own) goes, so nothing long-lived is left scattered among the
//! connection's freed allocations to keep their pages resident. One task per worker waits for
//! the epoll fd to become readable (through the worker's io driver, io_uring or epoll alike),
//! collects the sockets that have bytes, and starts their connection loops again. Deadlines
//! (idle timeout, or header timeout for a new connection) are enforced by a sweep every 200 ms.
//!
//! TLS connections park too: the idle read is cancelled inside the socket read, which only
//! starts when rustls holds no plaintext and every byte received was handed to it, so the
//! socket's readiness is the only thing to wait for. A parked TLS connection drops its socket
//! buffers and keeps only rustls' session state.

use super::{run, ClientIo, ConnGuard, Worker};
use monoio::net::TcpStream;
use std::cell::RefCell;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::rc::Rc;
use std::time::{Duration, Instant};

/// Events collected per `epoll_wait` call.
const EVENTS: usize = 256;

/// An idle connection's stream.
pub enum Idle {
    /// Plain HTTP: the socket alone (a runtime stream again when it wakes).
    Plain(OwnedFd),
    /// HTTPS.
    Tls(Box<crate::tls::TlsStream>),
}

impl Idle {
    /// Parks a plain stream as its bare descriptor, taken from the runtime's stream. Parking
    /// needs no new descriptor, so it works at the open-files limit: with a duplicate, each
    /// parking connection held two until the io_uring driver's asynchronous close of the
    /// original ran, and a burst of them near the limit closed connections. Should an
    /// operation still hold the stream, a duplicate is the fallback (`None` when no
    /// descriptor is left for it).
    pub fn plain(s: TcpStream) -> Option<Idle> {
        let s = match s.try_into_raw_fd() {
            // SAFETY: the stream gave the descriptor up: nothing else owns or closes it.
            Ok(fd) => return Some(Idle::Plain(unsafe { OwnedFd::from_raw_fd(fd) })),
            Err(s) => s,
        };
        // SAFETY: duplicating a descriptor the stream holds open; the result is checked and
        // then owned by the `OwnedFd` alone.
        let fd = unsafe { libc::fcntl(s.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 0) };
        if fd < 0 {
            return None;
        }
        drop(s);
        // SAFETY: `fd` is a fresh descriptor that nothing else owns.
        Some(Idle::Plain(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// Closes the connection (HTTPS: with close_notify, [`crate::tls::TlsStream::close_now`]).
    fn close(self) {
        match self {
            Idle::Plain(fd) => drop(fd),
            Idle::Tls(s) => s.close_now(),
        }
    }

    fn fd(&self) -> RawFd {
        match self {
            Idle::Plain(fd) => fd.as_raw_fd(),
            Idle::Tls(s) => s.tcp().as_raw_fd(),
        }
    }
}

struct Parked {
    stream: Idle,
    guard: ConnGuard,
    /// Milliseconds after [`Parker::base`] (kept small: one record per idle connection; the
    /// peer address is read back from the socket when it wakes).
    deadline_ms: u32,
}

/// One worker's parked connections.
pub struct Parker {
    /// The epoll set, wrapped in a monoio socket type only so the driver can wait on it.
    ep: monoio::net::udp::UdpSocket,
    epfd: RawFd,
    /// Origin of the parked deadlines.
    base: Instant,
    slots: RefCell<Vec<Option<Parked>>>,
    free: RefCell<Vec<u32>>,
}

/// Wraps a descriptor that is not a socket (an epoll set, an eventfd) in a monoio socket type,
/// only so the worker's io driver (io_uring or epoll) can wait for it to turn readable with
/// `readable(false)`. No socket call is ever made on it; it closes the descriptor when dropped.
/// Must run inside the worker's runtime.
pub(crate) fn readiness_carrier(fd: OwnedFd) -> std::io::Result<monoio::net::udp::UdpSocket> {
    monoio::net::udp::UdpSocket::from_std(std::net::UdpSocket::from(fd))
}

impl Parker {
    /// Creates the worker's epoll set; must run inside the worker's runtime.
    pub fn new() -> std::io::Result<Parker> {
        // SAFETY: plain system call; the returned fd is checked and then owned below.
        let epfd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if epfd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `epfd` is a fresh descriptor that nothing else owns.
        let ep = readiness_carrier(unsafe { OwnedFd::from_raw_fd(epfd) })?;
        Ok(Parker {
            ep,
            epfd,
            base: Instant::now(),
            slots: RefCell::new(Vec::new()),
            free: RefCell::new(Vec::new()),
        })
    }

    /// Number of parked connections.
    pub fn len(&self) -> usize {
        self.slots.borrow().len() - self.free.borrow().len()
    }

    /// Whether no connection is parked.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Parks a connection until it has bytes or `deadline` passes. On failure the connection
    /// is closed (dropped).
    pub fn park(&self, stream: Idle, guard: ConnGuard, deadline: Instant) {
        let fd = stream.fd();
        let mut slots = self.slots.borrow_mut();
        let idx = match self.free.borrow_mut().pop() {
            Some(i) => i as usize,
            None => {
                slots.push(None);
                slots.len() - 1
            }
        };
        let mut ev = libc::epoll_event {
            events: (libc::EPOLLIN | libc::EPOLLRDHUP | libc::EPOLLONESHOT) as u32,
            u64: idx as u64,
        };
        // SAFETY: both descriptors are open (we own the stream), `ev` is a valid event.
        let rc = unsafe { libc::epoll_ctl(self.epfd, libc::EPOLL_CTL_ADD, fd, &mut ev) };
        if rc != 0 {
            self.free.borrow_mut().push(idx as u32);
            return;
        }
        let ms = deadline.saturating_duration_since(self.base).as_millis();
        slots[idx] = Some(Parked {
            stream,
            guard,
            deadline_ms: u32::try_from(ms).unwrap_or(u32::MAX),
        });
    }

    fn unpark(&self, idx: usize) -> Option<Parked> {
        let p = self.slots.borrow_mut().get_mut(idx)?.take()?;
        // SAFETY: the socket is still open (owned by `p`); removing it from our epoll set.
        unsafe {
            libc::epoll_ctl(
                self.epfd,
                libc::EPOLL_CTL_DEL,
                p.stream.fd(),
                std::ptr::null_mut(),
            );
        }
        self.free.borrow_mut().push(idx as u32);
        Some(p)
    }

    fn deadline(&self, p: &Parked) -> Instant {
        self.base + Duration::from_millis(p.deadline_ms.into())
    }

    /// Closes parked connections whose deadline has passed.
    pub fn sweep(&self) {
        let now = Instant::now();
        let expired: Vec<usize> = self
            .slots
            .borrow()
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.as_ref().filter(|p| self.deadline(p) <= now).map(|_| i))
            .collect();
        for i in expired {
            if let Some(p) = self.unpark(i) {
                p.stream.close();
            }
        }
    }

    /// Closes every parked connection (shutdown).
    pub fn close_all(&self) {
        let n = self.slots.borrow().len();
        for i in 0..n {
            if let Some(p) = self.unpark(i) {
                p.stream.close();
            }
        }
    }
}

/// Serves a parked connection again, on a task of its own (it was served before).
fn resume<S: ClientIo + 'static>(
    w: &Rc<Worker>,
    s: S,
    peer: SocketAddr,
    guard: ConnGuard,
    now: Instant,
    deadline: Instant,
) {
    w.tasks
        .spawn(run(w.clone(), s, peer, guard, true, false, now, deadline));
}

/// The worker's park loop: wakes when parked sockets have bytes and resumes them.
pub async fn run_parker(w: Rc<Worker>) {
    let mut events: Vec<libc::epoll_event> = vec![libc::epoll_event { events: 0, u64: 0 }; EVENTS];
    loop {
        if w.parker.ep.readable(false).await.is_err() {
            return;
        }
        loop {
            // SAFETY: `events` holds EVENTS valid entries; timeout 0 never blocks.
            let n =
                unsafe { libc::epoll_wait(w.parker.epfd, events.as_mut_ptr(), EVENTS as i32, 0) };
            if n <= 0 {
                break;
            }
            let now = Instant::now();
            for ev in &events[..n as usize] {
                if let Some(p) = w.parker.unpark(ev.u64 as usize) {
                    let deadline = w.parker.deadline(&p);
                    // A socket that has no peer any more (reset while parked) is closed.
                    match p.stream {
                        Idle::Plain(fd) => {
                            let std = std::net::TcpStream::from(fd);
                            let Ok(peer) = std.peer_addr() else {
                                continue;
                            };
                            let Ok(s) = TcpStream::from_std(std) else {
                                continue;
                            };
                            resume(&w, s, peer, p.guard, now, deadline);
                        }
                        Idle::Tls(s) => {
                            let Ok(peer) = s.tcp().peer_addr() else {
                                continue;
                            };
                            resume(&w, *s, peer, p.guard, now, deadline);
                        }
                    }
                }
            }
            if (n as usize) < EVENTS {
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_parked_connection_costs_one_32_byte_slot() {
        assert!(
            std::mem::size_of::<Option<Parked>>() <= 32,
            "{}",
            std::mem::size_of::<Option<Parked>>()
        );
    }
}
