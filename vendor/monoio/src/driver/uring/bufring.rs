//! (Added by ringgate, see RINGGATE.md.) A provided-buffer ring for multishot receives.
//!
//! One ring per driver: `ENTRIES` buffers of `BUF_SIZE` bytes, registered with the kernel
//! as buffer group `BGID`. A multishot receive takes a buffer for each completion it posts;
//! the reader copies the bytes out and gives the buffer back with [`BufRing::recycle`].

use std::{
    alloc::{alloc_zeroed, dealloc, Layout},
    io,
    sync::atomic::{AtomicU16, Ordering},
};

use io_uring::{types::BufRingEntry, IoUring};

/// The buffer group id the multishot receives select from.
pub(crate) const BGID: u16 = 0x5247;
/// Buffers in the ring (a power of two).
const ENTRIES: u16 = 256;
/// Bytes per buffer.
pub(crate) const BUF_SIZE: usize = 4096;

/// One entry of the ring as the kernel lays it out (`struct io_uring_buf`); in the first
/// entry, `resv` is the ring's tail.
#[repr(C)]
struct RawEntry {
    addr: u64,
    len: u32,
    bid: u16,
    resv: u16,
}

const _: () = assert!(std::mem::size_of::<RawEntry>() == std::mem::size_of::<BufRingEntry>());

pub(crate) struct BufRing {
    ring: *mut BufRingEntry,
    bufs: *mut u8,
    /// The next tail to publish (the kernel reads the tail from the ring's first entry).
    tail: u16,
    registered: bool,
}

impl BufRing {
    fn ring_layout() -> Layout {
        Layout::from_size_align(ENTRIES as usize * std::mem::size_of::<BufRingEntry>(), 4096)
            .unwrap()
    }

    fn bufs_layout() -> Layout {
        Layout::from_size_align(ENTRIES as usize * BUF_SIZE, 4096).unwrap()
    }

    /// Allocates the ring and its buffers and registers them with `uring`.
    pub(crate) fn new(uring: &IoUring) -> io::Result<BufRing> {
        // SAFETY: both layouts have a non-zero size.
        let ring = unsafe { alloc_zeroed(Self::ring_layout()) }.cast::<BufRingEntry>();
        let bufs = unsafe { alloc_zeroed(Self::bufs_layout()) };
        if ring.is_null() || bufs.is_null() {
            // SAFETY: each pointer, when not null, came from `alloc_zeroed` with its layout.
            unsafe {
                if !ring.is_null() {
                    dealloc(ring.cast(), Self::ring_layout());
                }
                if !bufs.is_null() {
                    dealloc(bufs, Self::bufs_layout());
                }
            }
            return Err(io::Error::from(io::ErrorKind::OutOfMemory));
        }
        let mut r = BufRing {
            ring,
            bufs,
            tail: 0,
            registered: false,
        };
        // SAFETY: the ring memory is page-aligned, `ENTRIES` entries long, and stays allocated
        // until `unregister` (or, when that fails, for the life of the process: see Drop).
        unsafe {
            uring
                .submitter()
                .register_buf_ring(ring as u64, ENTRIES, BGID)?;
        }
        r.registered = true;
        for bid in 0..ENTRIES {
            r.push(bid);
        }
        r.publish();
        Ok(r)
    }

    /// Where buffer `bid` starts.
    #[inline]
    pub(crate) fn buf(&self, bid: u16) -> *const u8 {
        // SAFETY: `bid < ENTRIES` (the kernel only hands out ids it was given), so the offset
        // stays inside the buffers' allocation.
        unsafe { self.bufs.add((bid & (ENTRIES - 1)) as usize * BUF_SIZE) }
    }

    #[inline]
    fn push(&mut self, bid: u16) {
        let bid = bid & (ENTRIES - 1);
        let addr = self.buf(bid) as u64;
        // SAFETY: the slot index is masked to the ring's size, so the entry is inside the
        // ring's allocation. The kernel only reads slots between its head and the published
        // tail, and this one is past the tail. The fields are written through raw pointers,
        // never through a reference to the whole entry: the first entry's last field is the
        // tail, which the kernel reads at any time.
        unsafe {
            let e = self
                .ring
                .add((self.tail & (ENTRIES - 1)) as usize)
                .cast::<RawEntry>();
            std::ptr::addr_of_mut!((*e).addr).write(addr);
            std::ptr::addr_of_mut!((*e).len).write(BUF_SIZE as u32);
            std::ptr::addr_of_mut!((*e).bid).write(bid);
        }
        self.tail = self.tail.wrapping_add(1);
    }

    #[inline]
    fn publish(&self) {
        // SAFETY: the tail is the first entry's last field (`resv`, at byte 14), inside the
        // ring's allocation and aligned for a u16; the kernel reads it concurrently, hence
        // the atomic store.
        unsafe {
            let tail = std::ptr::addr_of!((*self.ring.cast::<RawEntry>()).resv) as *const AtomicU16;
            (*tail).store(self.tail, Ordering::Release);
        }
    }

    /// Gives buffer `bid` back to the kernel.
    #[inline]
    pub(crate) fn recycle(&mut self, bid: u16) {
        self.push(bid);
        self.publish();
    }

    /// Unregisters the ring. Called before the io_uring instance is closed, while no receive
    /// can be running (they run in this thread's task work).
    pub(crate) fn unregister(&mut self, uring: &IoUring) {
        if self.registered && uring.submitter().unregister_buf_ring(BGID).is_ok() {
            self.registered = false;
        }
    }
}

impl Drop for BufRing {
    fn drop(&mut self) {
        if self.registered {
            // Still registered: the kernel may yet write into the buffers, so they are never
            // given back to the allocator.
            return;
        }
        // SAFETY: both came from `alloc_zeroed` with these layouts, and the kernel no longer
        // knows them.
        unsafe {
            dealloc(self.ring.cast(), Self::ring_layout());
            dealloc(self.bufs, Self::bufs_layout());
        }
    }
}
