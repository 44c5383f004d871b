//! The tasks a worker spawns (connections, lingering closes, WebSocket takeovers, its own
//! loops), and ending all of them when the worker stops.
//!
//! monoio keeps no list of its tasks, and a task still pending when its runtime is dropped is
//! never freed: its waker waits in the driver, and its future holds the driver (an I/O
//! operation keeps the driver alive). Its sockets stay open and the driver's descriptors
//! leak. So every task goes through [`TaskSet::spawn`], which remembers the task's waker;
//! [`TaskSet::stop`] wakes them all with a flag set, and each then drops its future (closing
//! its sockets) instead of polling it.

use pin_project_lite::pin_project;
use std::cell::{Cell, RefCell};
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

/// One worker's live tasks.
#[derive(Default)]
pub struct TaskSet {
    stopping: Cell<bool>,
    /// Tasks spawned and not yet ended (counted from the spawn, before a first poll).
    live: Cell<usize>,
    /// Each polled task's waker, in a slot it frees when it ends.
    wakers: RefCell<Vec<Option<Waker>>>,
    free: RefCell<Vec<usize>>,
}

impl TaskSet {
    /// Spawns `fut` on the current runtime as a task that [`TaskSet::stop`] ends. After the
    /// stop, `fut` is dropped instead.
    pub fn spawn<F: Future<Output = ()> + 'static>(self: &Rc<Self>, fut: F) {
        if self.stopping.get() {
            return;
        }
        self.live.set(self.live.get() + 1);
        monoio::spawn(Stoppable {
            slot: Slot {
                set: self.clone(),
                index: None,
            },
            fut,
        });
    }

    /// Ends every task: each is woken and drops its future at its next poll. Returns at once;
    /// [`TaskSet::live`] says when they are all gone.
    pub fn stop(&self) {
        self.stopping.set(true);
        let wakers: Vec<Waker> = self
            .wakers
            .borrow_mut()
            .iter_mut()
            .flat_map(Option::take)
            .collect();
        for w in wakers {
            w.wake();
        }
    }

    /// Tasks not yet ended.
    pub fn live(&self) -> usize {
        self.live.get()
    }

    fn register(&self, w: Waker) -> usize {
        let mut wakers = self.wakers.borrow_mut();
        match self.free.borrow_mut().pop() {
            Some(i) => {
                wakers[i] = Some(w);
                i
            }
            None => {
                wakers.push(Some(w));
                wakers.len() - 1
            }
        }
    }
}

/// A task's place in its set; dropping it (when the task ends) frees the place.
struct Slot {
    set: Rc<TaskSet>,
    /// The waker's slot, taken at the first poll.
    index: Option<usize>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(i) = self.index {
            self.set.wakers.borrow_mut()[i] = None;
            self.set.free.borrow_mut().push(i);
        }
        self.set.live.set(self.set.live.get() - 1);
    }
}

pin_project! {
    /// A future that ends early once its set stops (the runtime then drops it, and with it
    /// the future it wraps).
    struct Stoppable<F> {
        slot: Slot,
        #[pin]
        fut: F,
    }
}

impl<F: Future<Output = ()>> Future for Stoppable<F> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.project();
        if this.slot.set.stopping.get() {
            return Poll::Ready(());
        }
        if this.slot.index.is_none() {
            // A task's waker wakes that task for its whole life: one clone is enough.
            this.slot.index = Some(this.slot.set.register(cx.waker().clone()));
        }
        this.fut.poll(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Drops a flag when dropped: proof that a task's future was freed.
    struct Dropped(Rc<Cell<bool>>);
    impl Drop for Dropped {
        fn drop(&mut self) {
            self.0.set(true);
        }
    }

    #[test]
    fn stop_ends_pending_tasks_and_frees_their_futures() {
        let mut rt = monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
            .enable_timer()
            .build()
            .unwrap();
        rt.block_on(async {
            let set = Rc::new(TaskSet::default());
            let done = Rc::new(Cell::new(0));
            let freed = Rc::new(Cell::new(false));
            // One task that finishes by itself, one that would sleep for an hour.
            let d = done.clone();
            set.spawn(async move { d.set(d.get() + 1) });
            let guard = Dropped(freed.clone());
            set.spawn(async move {
                let _g = guard;
                monoio::time::sleep(Duration::from_secs(3600)).await;
                unreachable!("stopped before waking");
            });
            assert_eq!(set.live(), 2);
            monoio::time::sleep(Duration::from_millis(5)).await;
            assert_eq!(done.get(), 1);
            assert_eq!(set.live(), 1);
            assert!(!freed.get());
            set.stop();
            monoio::time::sleep(Duration::from_millis(5)).await;
            assert_eq!(set.live(), 0);
            assert!(freed.get());
            // Nothing is spawned after the stop.
            let d = done.clone();
            set.spawn(async move { d.set(d.get() + 1) });
            monoio::time::sleep(Duration::from_millis(5)).await;
            assert_eq!((done.get(), set.live()), (1, 0));
            // Every waker slot is free again.
            assert!(set.wakers.borrow().iter().all(Option::is_none));
        });
    }
}
