//! (Added by ringgate, see RINGGATE.md.) Multishot receive for a `TcpStream` (io_uring).
//!
//! One receive stays armed in the kernel across reads: each arrival completes into a buffer
//! of the driver's provided-buffer ring, the completions queue in the driver, and a read
//! copies from them. No submission, no failed first attempt and no poll arming per read.
//! A read that is dropped loses nothing (the bytes stay queued). Cancelling a read through
//! its `CancelHandle` ends the multishot receive (queued bytes come first).

use std::{
    cell::{Cell, UnsafeCell},
    io,
    rc::Rc,
    task::{Context, Poll},
};

use super::RecvHeld;
use crate::driver::{op::OpCanceller, UringInner};

pub(crate) struct MultiRecv {
    driver: Rc<UnsafeCell<UringInner>>,
    /// The running receive's slot, if one runs (or its last completions wait).
    index: Cell<Option<usize>>,
    /// The buffer being read from: `(buffer id, offset, length)`.
    chunk: Option<(u16, u32, u32)>,
}

/// What a multishot read asks of its caller.
pub(crate) enum Next {
    /// `n` bytes were copied (0: end of stream).
    Read(io::Result<usize>),
    /// No receive runs: start one (or read single-shot when that fails).
    Arm,
    /// The buffer ring ran dry (or the kernel refused): read this once single-shot.
    Single,
}

impl MultiRecv {
    pub(crate) fn new(driver: Rc<UnsafeCell<UringInner>>) -> MultiRecv {
        MultiRecv {
            driver,
            index: Cell::new(None),
            chunk: None,
        }
    }

    /// Starts the multishot receive on `fd`; false when it could not be started.
    pub(crate) fn arm(&mut self, fd: std::os::unix::io::RawFd) -> bool {
        debug_assert!(self.index.get().is_none());
        self.index
            .set(UringInner::submit_multi_recv(&self.driver, fd));
        self.index.get().is_some()
    }

    /// A handle that cancels the running receive.
    pub(crate) fn canceller(&self) -> Option<OpCanceller> {
        self.index.get().map(|index| OpCanceller {
            index,
            #[cfg(feature = "legacy")]
            direction: None,
        })
    }

    /// What was received and not read yet. Completions that carry no bytes and only say the
    /// receive ended (the ring ran dry, a cancellation) are taken on the way: the next read
    /// starts a new receive.
    pub(crate) fn held(&self) -> RecvHeld {
        if self.chunk.is_some() {
            return RecvHeld::Bytes;
        }
        while let Some(index) = self.index.get() {
            let Some((res, flags)) = UringInner::multi_front(&self.driver, index) else {
                return RecvHeld::Nothing;
            };
            match res {
                r if r > 0 => return RecvHeld::Bytes,
                0 => return RecvHeld::End,
                r if r == -libc::ENOBUFS || r == -libc::ECANCELED => {
                    let _ = UringInner::multi_pop(&self.driver, index);
                    if let Some(bid) = io_uring::cqueue::buffer_select(flags) {
                        UringInner::multi_recycle(&self.driver, bid);
                    }
                    if !io_uring::cqueue::more(flags) {
                        self.index.set(None);
                    }
                }
                _ => return RecvHeld::End,
            }
        }
        RecvHeld::Nothing
    }

    /// Whether a receive runs.
    pub(crate) fn running(&self) -> bool {
        self.index.get().is_some()
    }

    /// Whether a receive runs or received bytes wait here.
    pub(crate) fn busy(&self) -> bool {
        self.index.get().is_some() || self.chunk.is_some()
    }

    /// Copies up to `cap` bytes to `dst` from what was received, waiting for an arrival.
    pub(crate) fn poll_read(
        &mut self,
        cx: &mut Context<'_>,
        dst: *mut u8,
        cap: usize,
    ) -> Poll<Next> {
        loop {
            if let Some((bid, off, len)) = self.chunk {
                let n = ((len - off) as usize).min(cap);
                // SAFETY: the provided buffer `bid` holds `len` received bytes, of which
                // `off..off + n` are in bounds; `dst` is valid for `cap >= n` bytes (the
                // caller's buffer) and cannot overlap the driver's buffer ring.
                unsafe {
                    let src = UringInner::multi_buf(&self.driver, bid).add(off as usize);
                    std::ptr::copy_nonoverlapping(src, dst, n);
                }
                if off as usize + n == len as usize {
                    UringInner::multi_recycle(&self.driver, bid);
                    self.chunk = None;
                } else {
                    self.chunk = Some((bid, off + n as u32, len));
                }
                return Poll::Ready(Next::Read(Ok(n)));
            }
            let Some(index) = self.index.get() else {
                return Poll::Ready(Next::Arm);
            };
            let (res, flags) = std::task::ready!(UringInner::poll_multi(&self.driver, index, cx));
            if !io_uring::cqueue::more(flags) {
                self.index.set(None);
            }
            let bid = io_uring::cqueue::buffer_select(flags);
            if res > 0 {
                if let Some(bid) = bid {
                    self.chunk = Some((bid, 0, res as u32));
                    continue;
                }
            } else if let Some(bid) = bid {
                UringInner::multi_recycle(&self.driver, bid);
            }
            return Poll::Ready(match res {
                0 => Next::Read(Ok(0)),
                r if r == -libc::ENOBUFS => Next::Single,
                r if r == -libc::EINVAL => {
                    // A kernel without multishot receives (before 6.0): not again.
                    UringInner::multi_refused(&self.driver);
                    Next::Single
                }
                r if r > 0 => Next::Single,
                r => Next::Read(Err(io::Error::from_raw_os_error(-r))),
            });
        }
    }
}

impl Drop for MultiRecv {
    fn drop(&mut self) {
        if let Some((bid, _, _)) = self.chunk.take() {
            UringInner::multi_recycle(&self.driver, bid);
        }
        if let Some(index) = self.index.take() {
            UringInner::drop_multi(&self.driver, index);
        }
    }
}
