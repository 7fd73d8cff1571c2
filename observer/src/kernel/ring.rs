//! The daemon's side of the programs' ring buffer (`EVENTS`), read in
//! batches. aya's `RingBuf` publishes its position after every record; the
//! kernel reads that position at every reserve, so each record the daemon
//! read cost the next `bind()` on another CPU a cache miss. Here the position
//! is published once per batch.
//!
//! The layout is the kernel's (kernel/bpf/ringbuf.c): a consumer page (our
//! position, read-write), then a producer page (its position) and the data
//! pages mapped twice in a row, so that a record that wraps around the end
//! reads as one slice. Each record has an 8-byte header: its length, with a
//! busy bit (not committed yet) and a discard bit.

use std::{
    io,
    os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd},
    ptr::NonNull,
    sync::atomic::{AtomicU32, AtomicUsize, Ordering, fence},
};

use aya::maps::MapData;

const BUSY: u32 = 1 << 31;
const DISCARD: u32 = 1 << 30;
const HEADER: usize = 8;

pub struct Ring {
    map: MapData,
    consumer: Mapping,
    producer: Mapping,
    page: usize,
    mask: usize,
    /// Our position: read up to here.
    pos: usize,
    /// The producer's position when last read.
    seen: usize,
    /// Read past what was last published.
    unpublished: bool,
}

/// One `mmap` of the map's fd, unmapped on drop.
struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

impl Mapping {
    fn new(fd: BorrowedFd<'_>, len: usize, prot: i32, offset: usize) -> io::Result<Mapping> {
        // SAFETY: a fresh shared mapping of the map's fd; the kernel checks the length,
        // protection and offset against the ring buffer's layout.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                prot,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                offset as libc::off_t,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = NonNull::new(p.cast()).ok_or_else(|| io::Error::other("mmap returned null"))?;
        Ok(Mapping { ptr, len })
    }

    /// The word-sized position at the start of a metadata page.
    fn position(&self) -> &AtomicUsize {
        // SAFETY: the page is mapped for as long as `self`, page-aligned, and the
        // kernel keeps an unsigned long there, which it and we access atomically.
        unsafe { self.ptr.cast::<AtomicUsize>().as_ref() }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly what `new` mapped; nothing borrows it past `self`.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

impl Ring {
    pub fn new(map: MapData) -> io::Result<Ring> {
        let size = map.info().map_err(io::Error::other)?.max_entries() as usize;
        if !size.is_power_of_two() {
            return Err(io::Error::other(format!(
                "ring buffer of {size} bytes: not a power of two"
            )));
        }
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
        let fd = map.fd().as_fd();
        let consumer = Mapping::new(fd, page, libc::PROT_READ | libc::PROT_WRITE, 0)?;
        let producer = Mapping::new(fd, page + 2 * size, libc::PROT_READ, page)?;
        let pos = consumer.position().load(Ordering::Acquire);
        let seen = producer.position().load(Ordering::Acquire);
        Ok(Ring {
            map,
            consumer,
            producer,
            page,
            mask: size - 1,
            pos,
            seen,
            unpublished: false,
        })
    }

    /// Calls `each` with every committed record waiting, `max` at most, in
    /// order; publishes the new position once; returns how many it read.
    pub fn read(&mut self, max: usize, mut each: impl FnMut(&[u8])) -> usize {
        let mut n = 0;
        while n < max {
            if self.pos == self.seen {
                if self.unpublished {
                    // Publish before looking again, so that a producer either
                    // sees the room we made or we see what it committed.
                    self.publish();
                    fence(Ordering::SeqCst);
                }
                self.seen = self.producer.position().load(Ordering::Acquire);
                if self.pos == self.seen {
                    break;
                }
            }
            let at = self.page + (self.pos & self.mask);
            // SAFETY: `at` is within the first copy of the data pages; the header is
            // 8-aligned (every record's length is rounded up to 8) and the kernel
            // writes it atomically (xchg at commit).
            let header = unsafe {
                self.producer
                    .ptr
                    .add(at)
                    .cast::<AtomicU32>()
                    .as_ref()
                    .load(Ordering::Acquire)
            };
            if header & BUSY != 0 {
                break; // reserved, not committed yet: records are read in order
            }
            let len = (header & !(BUSY | DISCARD)) as usize;
            if header & DISCARD == 0 {
                // SAFETY: the record lies after its header, within the data pages'
                // two copies (`len` is less than the ring's size); committed, so the
                // producer no longer writes it until we publish a position past it.
                let data = unsafe {
                    std::slice::from_raw_parts(self.producer.ptr.add(at + HEADER).as_ptr(), len)
                };
                each(data);
                n += 1;
            }
            self.pos += (HEADER + len).next_multiple_of(8);
            self.unpublished = true;
        }
        self.publish();
        n
    }

    fn publish(&mut self) {
        if self.unpublished {
            // Release: the records are read before the kernel may reuse their room.
            self.consumer.position().store(self.pos, Ordering::Release);
            self.unpublished = false;
        }
    }
}

impl AsFd for Ring {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.map.fd().as_fd()
    }
}

impl AsRawFd for Ring {
    fn as_raw_fd(&self) -> RawFd {
        self.as_fd().as_raw_fd()
    }
}
