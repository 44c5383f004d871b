//! Uring state lifecycle.
//! Partly borrow from tokio-uring.

use std::{
    io,
    task::{Context, Poll, Waker},
};

use crate::{driver::op::CompletionMeta, utils::slab::Ref};

pub(crate) enum Lifecycle {
    /// The operation has been submitted to uring and is currently in-flight
    Submitted,

    /// The submitter is waiting for the completion of the operation
    Waiting(Waker),

    /// The submitter no longer has interest in the operation result. The state
    /// must be passed to the driver and held until the operation completes.
    #[allow(dead_code)]
    Ignored(Box<dyn std::any::Any>),

    /// The operation has completed.
    Completed(io::Result<u32>, u32),

    /// (ringgate) A multishot operation: its completions queue up until the owner takes them.
    Multi(Box<MultiState>),
}

/// (ringgate) The completions of a multishot operation not taken yet.
pub(crate) struct MultiState {
    /// `(result, flags)` of each completion, oldest first.
    pub(crate) queue: std::collections::VecDeque<(i32, u32)>,
    pub(crate) waker: Option<Waker>,
    /// The owner is gone: completions only give their buffers back, and the last one frees
    /// the slot.
    pub(crate) ignored: bool,
    /// A cancellation was asked for (too many completions queued).
    pub(crate) cancelling: bool,
}

/// (ringgate) Completions one multishot receive may queue before it is cancelled, so one
/// connection that is not read (its upstream stalls) cannot take every buffer of the ring.
/// The rest waits in the socket, under TCP's flow control; the next read starts it again.
pub(crate) const MULTI_QUEUE_CAP: usize = 8;

/// (ringgate) What the driver must do after a multishot completion.
pub(crate) enum MultiDone {
    Kept,
    /// Queued, and the queue is full: cancel the receive.
    Cancel,
    /// The owner is gone: give this completion's buffer (if any) back.
    Dropped {
        flags: u32,
    },
}

impl<'a> Ref<'a, Lifecycle> {
    pub(crate) fn complete(mut self, result: io::Result<u32>, flags: u32) {
        let ref_mut = &mut *self;
        match ref_mut {
            Lifecycle::Submitted => {
                *ref_mut = Lifecycle::Completed(result, flags);
            }
            Lifecycle::Waiting(_) => {
                let old = std::mem::replace(ref_mut, Lifecycle::Completed(result, flags));
                match old {
                    Lifecycle::Waiting(waker) => {
                        waker.wake();
                    }
                    _ => unsafe { std::hint::unreachable_unchecked() },
                }
            }
            Lifecycle::Ignored(..) => {
                self.remove();
            }
            Lifecycle::Completed(..) => unsafe { std::hint::unreachable_unchecked() },
            Lifecycle::Multi(..) => unreachable!("complete_multi handles multishot operations"),
        }
    }

    /// (ringgate) Whether this slot holds a multishot operation.
    pub(crate) fn is_multi(&self) -> bool {
        matches!(**self, Lifecycle::Multi(..))
    }

    /// (ringgate) Queues a completion of a multishot operation (or, when its owner is gone,
    /// says to give the buffer back and frees the slot after the last completion).
    pub(crate) fn complete_multi(mut self, res: i32, flags: u32) -> MultiDone {
        let Lifecycle::Multi(state) = &mut *self else {
            unreachable!()
        };
        if state.ignored {
            if !io_uring::cqueue::more(flags) {
                self.remove();
            }
            return MultiDone::Dropped { flags };
        }
        state.queue.push_back((res, flags));
        if let Some(w) = state.waker.take() {
            w.wake();
        }
        if state.queue.len() >= MULTI_QUEUE_CAP
            && !state.cancelling
            && io_uring::cqueue::more(flags)
        {
            state.cancelling = true;
            return MultiDone::Cancel;
        }
        MultiDone::Kept
    }

    /// (ringgate) The oldest completion of a multishot operation, left queued.
    pub(crate) fn front_multi(&self) -> Option<(i32, u32)> {
        match &**self {
            Lifecycle::Multi(state) => state.queue.front().copied(),
            _ => None,
        }
    }

    /// (ringgate) Takes the oldest completion of a multishot operation, if any; the slot is
    /// freed with the last one.
    pub(crate) fn pop_multi(mut self) -> Option<(i32, u32)> {
        let Lifecycle::Multi(state) = &mut *self else {
            unreachable!()
        };
        let (res, flags) = state.queue.pop_front()?;
        if !io_uring::cqueue::more(flags) {
            self.remove();
        }
        Some((res, flags))
    }

    /// (ringgate) Takes the oldest completion of a multishot operation, or registers the
    /// waker. The slot is freed with the last completion (the one without `F_MORE`).
    pub(crate) fn poll_multi(mut self, cx: &mut Context<'_>) -> Poll<(i32, u32)> {
        let Lifecycle::Multi(state) = &mut *self else {
            unreachable!()
        };
        match state.queue.pop_front() {
            Some((res, flags)) => {
                if !io_uring::cqueue::more(flags) {
                    self.remove();
                }
                Poll::Ready((res, flags))
            }
            None => {
                match &state.waker {
                    Some(w) if w.will_wake(cx.waker()) => {}
                    _ => state.waker = Some(cx.waker().clone()),
                }
                Poll::Pending
            }
        }
    }

    /// (ringgate) The owner of a multishot operation is gone: returns the flags of the
    /// completions it had not taken (their buffers go back), frees the slot if the last
    /// completion was among them, and otherwise says the operation must be cancelled.
    pub(crate) fn drop_multi(mut self, pending: &mut Vec<u32>) -> bool {
        let Lifecycle::Multi(state) = &mut *self else {
            unreachable!()
        };
        let mut ended = false;
        for (_, flags) in state.queue.drain(..) {
            ended |= !io_uring::cqueue::more(flags);
            pending.push(flags);
        }
        if ended {
            self.remove();
            return false;
        }
        state.ignored = true;
        state.waker = None;
        true
    }

    #[allow(clippy::needless_pass_by_ref_mut)]
    pub(crate) fn poll_op(mut self, cx: &mut Context<'_>) -> Poll<CompletionMeta> {
        let ref_mut = &mut *self;
        match ref_mut {
            Lifecycle::Submitted => {
                *ref_mut = Lifecycle::Waiting(cx.waker().clone());
                return Poll::Pending;
            }
            Lifecycle::Waiting(waker) => {
                if !waker.will_wake(cx.waker()) {
                    *ref_mut = Lifecycle::Waiting(cx.waker().clone());
                }
                return Poll::Pending;
            }
            _ => {}
        }

        match self.remove() {
            Lifecycle::Completed(result, flags) => Poll::Ready(CompletionMeta { result, flags }),
            _ => unsafe { std::hint::unreachable_unchecked() },
        }
    }

    // return if the op must has been finished
    pub(crate) fn drop_op<T: 'static>(mut self, data: &mut Option<T>) -> bool {
        let ref_mut = &mut *self;
        match ref_mut {
            Lifecycle::Submitted | Lifecycle::Waiting(_) => {
                if let Some(data) = data.take() {
                    *ref_mut = Lifecycle::Ignored(Box::new(data));
                } else {
                    *ref_mut = Lifecycle::Ignored(Box::new(())); // () is a ZST, so it does not
                                                                 // allocate
                };
                return false;
            }
            Lifecycle::Completed(..) => {
                self.remove();
            }
            Lifecycle::Ignored(..) | Lifecycle::Multi(..) => unsafe {
                std::hint::unreachable_unchecked()
            },
        }
        true
    }
}
