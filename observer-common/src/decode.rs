//! Checked decoding of ring-buffer records (user side).

use crate::{BindRecord, Header, Kind, SockCallRecord, TcpStateRecord, TimeWaitRecord};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("record of {0} bytes is shorter than its header")]
    Short(usize),
    #[error("unknown record kind {0}")]
    UnknownKind(u32),
    #[error("{kind:?} record of {got} bytes, expected {want}")]
    Length { kind: Kind, got: usize, want: usize },
}

/// A record, copied out of the ring buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    Bind(BindRecord),
    TcpState(TcpStateRecord),
    SockCall(SockCallRecord),
    TimeWait(TimeWaitRecord),
}

/// Decodes one ring-buffer entry: reads the kind, checks the length, copies unaligned.
pub fn decode(bytes: &[u8]) -> Result<Record, DecodeError> {
    if bytes.len() < size_of::<Header>() {
        return Err(DecodeError::Short(bytes.len()));
    }
    let raw_kind = u32::from_ne_bytes(
        bytes[core::mem::offset_of!(Header, kind)..][..4]
            .try_into()
            .expect("4 bytes"),
    );
    let kind = Kind::from_u32(raw_kind).ok_or(DecodeError::UnknownKind(raw_kind))?;
    let want = kind.record_size();
    if bytes.len() != want {
        return Err(DecodeError::Length {
            kind,
            got: bytes.len(),
            want,
        });
    }
    Ok(match kind {
        Kind::Bind => Record::Bind(copy_out(bytes)),
        Kind::TcpState => Record::TcpState(copy_out(bytes)),
        Kind::SockCall => Record::SockCall(copy_out(bytes)),
        Kind::TimeWait => Record::TimeWait(copy_out(bytes)),
    })
}

/// Copies a record out of (unaligned) ring-buffer memory whose length `decode` checked.
fn copy_out<T: aya::Pod>(bytes: &[u8]) -> T {
    assert_eq!(bytes.len(), size_of::<T>());
    // SAFETY: the length is checked; T is plain old data (`aya::Pod`).
    unsafe { core::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) }
}

/// The bytes of a record, as the kernel side writes them (for tests and tools).
pub fn encode<T: aya::Pod>(record: &T) -> &[u8] {
    // SAFETY: records are `repr(C)` plain old data without padding holes
    // (checked by the layout tests).
    unsafe { core::slice::from_raw_parts((record as *const T).cast::<u8>(), size_of::<T>()) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{bind::flags, task::TaskHeader};

    #[test]
    fn bind_round_trip() {
        let mut r = BindRecord::zeroed();
        r.task.pid_tgid = (42 << 32) | 43;
        r.ret = -98;
        r.family = 2;
        r.flags = flags::SOCKET | flags::REUSEADDR_KNOWN;
        r.sockaddr[..4].copy_from_slice(&[2, 0, 0x16, 0x44]);
        r.task.comm[..4].copy_from_slice(b"curl");
        assert_eq!(decode(encode(&r)), Ok(Record::Bind(r)));
    }

    #[test]
    fn rejects_short_unknown_and_wrong_length() {
        assert_eq!(decode(&[0; 8]), Err(DecodeError::Short(8)));
        let mut bytes = encode(&BindRecord::zeroed()).to_vec();
        bytes[0] = 99;
        assert_eq!(decode(&bytes), Err(DecodeError::UnknownKind(99)));
        let zeroed = BindRecord::zeroed();
        let bytes = encode(&zeroed);
        assert_eq!(
            decode(&bytes[..bytes.len() - 1]),
            Err(DecodeError::Length {
                kind: Kind::Bind,
                got: bytes.len() - 1,
                want: size_of::<BindRecord>()
            })
        );
    }

    #[test]
    fn tcp_state_and_sockcall_round_trip() {
        let mut t = TcpStateRecord::zeroed();
        t.skaddr = 0xffff_8881_0000_1000;
        t.oldstate = crate::tcp::state::FIN_WAIT2;
        t.newstate = crate::tcp::state::CLOSE;
        assert_eq!(decode(encode(&t)), Ok(Record::TcpState(t)));
        let mut c = SockCallRecord::zeroed(crate::sockcall::Call::Connect);
        c.ret = -99;
        assert_eq!(decode(encode(&c)), Ok(Record::SockCall(c)));
    }

    #[test]
    fn other_layouts_have_no_padding() {
        assert_eq!(
            size_of::<TcpStateRecord>(),
            16 + 2 * 8 + size_of::<TaskHeader>() + 4 + 2 + 2 + 4 * 2 + 2 * 16
        );
        assert_eq!(
            size_of::<SockCallRecord>(),
            16 + size_of::<TaskHeader>()
                + 2 * 8
                + 4 * 4
                + 2 * 2
                + 4
                + 16
                + crate::bind::SOCKADDR_MAX
        );
        assert_eq!(
            size_of::<TimeWaitRecord>(),
            16 + 4 * 8 + size_of::<TaskHeader>() + 4 + 1 + 1 + 2 + 4 * 2 + 2 * 16
        );
    }

    #[test]
    fn layout_has_no_padding() {
        // encode() exposes every byte: the layout must have no implicit padding.
        assert_eq!(size_of::<TaskHeader>(), 3 * 8 + 2 * 4 + 16);
        let fields = size_of::<Header>()
            + size_of::<TaskHeader>()
            + 4 * 8
            + 4 * 4
            + 4 * 2
            + crate::bind::SOCKADDR_MAX;
        assert_eq!(size_of::<BindRecord>(), fields);
        assert_eq!(size_of::<BindRecord>() % 8, 0);
    }
}

#[cfg(test)]
mod properties {
    extern crate std;
    use std::{vec, vec::Vec};

    use super::*;
    use proptest::prelude::*;

    fn kind_sized(kind: Kind, fill: u8) -> Vec<u8> {
        let mut bytes = vec![fill; kind.record_size()];
        bytes[..4].copy_from_slice(&(kind as u32).to_ne_bytes());
        bytes
    }

    proptest! {
        /// Any bytes at all: a record or an error, never a panic.
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = decode(&bytes);
        }

        /// Every kind at its exact size decodes whatever the payload says.
        #[test]
        fn right_size_any_payload_decodes(fill in any::<u8>(), which in 0usize..4) {
            let kind = [Kind::Bind, Kind::TcpState, Kind::SockCall, Kind::TimeWait][which];
            prop_assert!(decode(&kind_sized(kind, fill)).is_ok());
        }
    }
}
