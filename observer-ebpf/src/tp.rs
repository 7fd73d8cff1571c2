//! Fields of a classic tracepoint's record, read by plain loads: a
//! tracepoint program may read its record directly (the verifier checks the
//! constant offset), which costs far less than a `bpf_probe_read_kernel` call.

use aya_ebpf::{EbpfContext, programs::TracePointContext};

/// The result's offset in every `syscalls:sys_exit_*` record (`long ret`).
const EXIT_RET: usize = 16;

/// A field of the record.
///
/// # Safety
/// `off` must be a field of type `T` in this tracepoint's record, aligned to
/// `T`'s size, and at or past byte 8 (the common fields are not readable).
#[inline(always)]
pub unsafe fn field<T: Copy>(ctx: &TracePointContext, off: usize) -> T {
    // SAFETY: the caller names a field of the record; the verifier refuses any
    // offset outside it or misaligned.
    unsafe { *ctx.as_ptr().cast::<u8>().add(off).cast::<T>() }
}

/// A syscall's result, in a `syscalls:sys_exit_*` program.
#[inline(always)]
pub fn exit_ret(ctx: &TracePointContext) -> i64 {
    // SAFETY: offset 16 of every sys_exit_* record is `long ret`, 8-aligned.
    unsafe { field(ctx, EXIT_RET) }
}
