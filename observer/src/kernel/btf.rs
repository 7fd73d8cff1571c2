//! The few facts the daemon asks of the kernel's BTF: member offsets of named
//! structs and the values of named enumerators. One pass over the type
//! section indexes where each type starts and which ids carry the struct names
//! asked for; nothing else is decoded. (A general BTF library decodes every
//! type of the ~5 MB vmlinux BTF up front: 150–250 ms of the daemon's startup.)
//!
//! Format: `Documentation/bpf/btf.rst`.

use std::collections::HashMap;

const MAGIC: u16 = 0xeb9f;
const HEADER_LEN: usize = 24;

const KIND_INT: u32 = 1;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_DECL_TAG: u32 = 17;
const KIND_TYPE_TAG: u32 = 18;
const KIND_ENUM64: u32 = 19;

pub struct Btf {
    data: Vec<u8>,
    /// Where the types start, and the strings.
    types_at: usize,
    strings: std::ops::Range<usize>,
    /// `offsets[id - 1]`: where type `id` starts, relative to `types_at`.
    offsets: Vec<u32>,
    /// Struct ids by a hash of their name, sorted: no string is made or
    /// checked for the ~10,000 structs of which a dozen are asked for.
    structs: Vec<(u64, u32)>,
}

/// One type's common header.
#[derive(Clone, Copy)]
struct Head {
    name_off: u32,
    kind: u32,
    vlen: usize,
    kind_flag: bool,
    /// Size, or the type it refers to.
    size_or_type: u32,
    /// Where its kind-specific data starts (absolute).
    rest: usize,
}

impl Btf {
    pub fn from_file(path: &str) -> Result<Btf, String> {
        let data = std::fs::read(path).map_err(|e| format!("{path}: {e}"))?;
        Btf::parse(data).map_err(|e| format!("{path}: {e}"))
    }

    pub fn parse(data: Vec<u8>) -> Result<Btf, String> {
        let u32_at = |at: usize| -> Result<u32, String> {
            data.get(at..at + 4)
                .map(|b| u32::from_ne_bytes(b.try_into().expect("4 bytes")))
                .ok_or_else(|| "truncated header".to_owned())
        };
        if data.get(..2).map(|m| u16::from_ne_bytes([m[0], m[1]])) != Some(MAGIC) {
            return Err("not BTF in this machine's byte order".into());
        }
        let hdr_len = u32_at(4)? as usize;
        if hdr_len < HEADER_LEN {
            return Err(format!("header of {hdr_len} bytes"));
        }
        let (type_off, type_len) = (u32_at(8)? as usize, u32_at(12)? as usize);
        let (str_off, str_len) = (u32_at(16)? as usize, u32_at(20)? as usize);
        let types_at = hdr_len + type_off;
        let strings = hdr_len + str_off..hdr_len + str_off + str_len;
        if types_at + type_len > data.len() || strings.end > data.len() {
            return Err("sections run past the end".into());
        }
        let mut btf = Btf {
            data,
            types_at,
            strings,
            offsets: Vec::new(),
            structs: Vec::new(),
        };
        let mut at = types_at;
        while at < types_at + type_len {
            let id = btf.offsets.len() as u32 + 1;
            btf.offsets.push((at - types_at) as u32);
            let h = btf.head(at).ok_or("truncated type")?;
            if h.kind == KIND_STRUCT && h.name_off != 0 {
                let name = btf.name_bytes(h.name_off).ok_or("bad name offset")?;
                btf.structs.push((name_hash(name), id));
            }
            at = h.rest + extra_len(&h).ok_or_else(|| format!("unknown kind {}", h.kind))?;
        }
        if at != types_at + type_len {
            return Err("the last type runs past the type section".into());
        }
        btf.structs.sort_unstable();
        Ok(btf)
    }

    fn u32(&self, at: usize) -> Option<u32> {
        self.data
            .get(at..at + 4)
            .map(|b| u32::from_ne_bytes(b.try_into().expect("4 bytes")))
    }

    fn head(&self, at: usize) -> Option<Head> {
        let info = self.u32(at + 4)?;
        Some(Head {
            name_off: self.u32(at)?,
            kind: (info >> 24) & 0x1f,
            vlen: (info & 0xffff) as usize,
            kind_flag: info >> 31 == 1,
            size_or_type: self.u32(at + 8)?,
            rest: at + 12,
        })
    }

    fn head_of(&self, id: u32) -> Option<Head> {
        let off = *self.offsets.get(id.checked_sub(1)? as usize)?;
        self.head(self.types_at + off as usize)
    }

    fn name_bytes(&self, off: u32) -> Option<&[u8]> {
        let start = self.strings.start + off as usize;
        let bytes = self.data.get(start..self.strings.end)?;
        let end = bytes.iter().position(|&b| b == 0)?;
        Some(&bytes[..end])
    }

    fn str(&self, off: u32) -> Option<&str> {
        std::str::from_utf8(self.name_bytes(off)?).ok()
    }

    /// The ids of the structs named `name`.
    fn structs_named<'a>(&'a self, name: &'a str) -> impl Iterator<Item = u32> + 'a {
        let hash = name_hash(name.as_bytes());
        let from = self.structs.partition_point(|&(h, _)| h < hash);
        self.structs[from..]
            .iter()
            .take_while(move |&&(h, _)| h == hash)
            .map(|&(_, id)| id)
            .filter(move |&id| {
                self.head_of(id)
                    .and_then(|h| self.name_bytes(h.name_off))
                    .is_some_and(|n| n == name.as_bytes())
            })
    }

    /// Bit offset of `member` in struct `ty` (any struct of that name that
    /// has it), looking into anonymous structs and unions.
    pub fn member_bit_offset(&self, ty: &str, member: &str) -> Option<u32> {
        self.structs_named(ty)
            .find_map(|id| self.find_in(id, member, 0))
    }

    /// Byte offset of `member` in struct `ty`.
    pub fn member_offset(&self, ty: &str, member: &str) -> Option<u32> {
        self.member_bit_offset(ty, member).map(|bits| bits / 8)
    }

    fn find_in(&self, id: u32, member: &str, depth: u32) -> Option<u32> {
        let h = self.head_of(id)?;
        if !matches!(h.kind, KIND_STRUCT | KIND_UNION) || depth > 8 {
            return None;
        }
        (0..h.vlen).find_map(|i| {
            let m = h.rest + i * 12;
            let (name_off, ty, offset) = (self.u32(m)?, self.u32(m + 4)?, self.u32(m + 8)?);
            // With kind_flag, the top 8 bits are a bitfield's size.
            let bits = if h.kind_flag {
                offset & 0xff_ffff
            } else {
                offset
            };
            if name_off != 0 {
                return (self.str(name_off)? == member).then_some(bits);
            }
            // Anonymous struct or union: its members are the outer struct's.
            self.find_in(self.skip_modifiers(ty)?, member, depth + 1)
                .map(|o| o + bits)
        })
    }

    /// The type behind typedefs and qualifiers.
    fn skip_modifiers(&self, mut id: u32) -> Option<u32> {
        for _ in 0..16 {
            let h = self.head_of(id)?;
            match h.kind {
                KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => {
                    id = h.size_or_type
                }
                _ => return Some(id),
            }
        }
        None
    }

    /// The values of these enumerators, wherever they are defined.
    pub fn enum_values(&self, names: &[&str]) -> HashMap<String, u32> {
        let mut found = HashMap::new();
        for id in 1..=self.offsets.len() as u32 {
            let Some(h) = self.head_of(id) else { break };
            let stride = match h.kind {
                KIND_ENUM => 8,
                KIND_ENUM64 => 12,
                _ => continue,
            };
            for i in 0..h.vlen {
                let m = h.rest + i * stride;
                let (Some(name), Some(val)) =
                    (self.u32(m).and_then(|n| self.str(n)), self.u32(m + 4))
                else {
                    continue;
                };
                if names.contains(&name) {
                    found.insert(name.to_owned(), val);
                }
            }
            if found.len() == names.len() {
                break;
            }
        }
        found
    }
}

fn name_hash(name: &[u8]) -> u64 {
    use std::hash::BuildHasher;
    foldhash::fast::FixedState::with_seed(0).hash_one(name)
}

/// Bytes of kind-specific data after a type's header; `None` for a kind
/// this reader does not know (a newer BTF: refuse rather than misread).
fn extra_len(h: &Head) -> Option<usize> {
    Some(match h.kind {
        KIND_INT | KIND_VAR | KIND_DECL_TAG => 4,
        KIND_ARRAY => 12,
        KIND_STRUCT | KIND_UNION | KIND_DATASEC | KIND_ENUM64 => 12 * h.vlen,
        KIND_ENUM | KIND_FUNC_PROTO => 8 * h.vlen,
        // PTR, FWD, TYPEDEF, VOLATILE, CONST, RESTRICT, FUNC, FLOAT, TYPE_TAG
        2 | 7..=12 | 16 | KIND_TYPE_TAG => 0,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small BTF built by hand: `struct outer { int a; union { int b; struct
    /// { int c:3, d:5; }; }; }` and `enum { E_ONE = 1, E_TWO = 2 }`.
    fn sample() -> Vec<u8> {
        let mut strings = b"\0int\0outer\0a\0b\0c\0d\0E_ONE\0E_TWO\0".to_vec();
        let s = |name: &str, strings: &[u8]| -> u32 {
            let pat = format!("{name}\0");
            (1..strings.len())
                .find(|&i| strings[i - 1] == 0 && strings[i..].starts_with(pat.as_bytes()))
                .unwrap() as u32
        };
        let mut t: Vec<u32> = Vec::new();
        let info = |kind: u32, vlen: u32, kf: bool| (kf as u32) << 31 | kind << 24 | vlen;
        // 1: int
        t.extend([s("int", &strings), info(KIND_INT, 0, false), 4, 32]);
        // 2: anonymous struct { int c:3; int d:5; } (kind_flag: bitfields)
        t.extend([0, info(KIND_STRUCT, 2, true), 4]);
        t.extend([s("c", &strings), 1, 3 << 24]);
        t.extend([s("d", &strings), 1, 5 << 24 | 3]);
        // 3: anonymous union { int b; struct 2; }
        t.extend([0, info(KIND_UNION, 2, false), 4]);
        t.extend([s("b", &strings), 1, 0, 0, 2, 0]);
        // 4: typedef of 3 (anonymous members can hide behind one)
        t.extend([0, info(KIND_TYPEDEF, 0, false), 3]);
        // 5: struct outer { int a; <4> at 32 bits }
        t.extend([s("outer", &strings), info(KIND_STRUCT, 2, false), 8]);
        t.extend([s("a", &strings), 1, 0, 0, 4, 32]);
        // 6: enum { E_ONE = 1, E_TWO = 2 }
        t.extend([0, info(KIND_ENUM, 2, false), 4]);
        t.extend([s("E_ONE", &strings), 1, s("E_TWO", &strings), 2]);
        let types: Vec<u8> = t.iter().flat_map(|v| v.to_ne_bytes()).collect();
        let mut out = Vec::new();
        out.extend(MAGIC.to_ne_bytes());
        out.extend([1u8, 0]);
        for v in [
            24u32,
            0,
            types.len() as u32,
            types.len() as u32,
            strings.len() as u32,
        ] {
            out.extend(v.to_ne_bytes());
        }
        out.extend(types);
        out.append(&mut strings);
        out
    }

    #[test]
    fn members_through_anonymous_unions_structs_and_typedefs() {
        let btf = Btf::parse(sample()).unwrap();
        assert_eq!(btf.member_bit_offset("outer", "a"), Some(0));
        assert_eq!(btf.member_bit_offset("outer", "b"), Some(32));
        assert_eq!(btf.member_bit_offset("outer", "c"), Some(32));
        assert_eq!(btf.member_bit_offset("outer", "d"), Some(35));
        assert_eq!(btf.member_offset("outer", "d"), Some(4));
        assert_eq!(btf.member_bit_offset("outer", "e"), None);
        assert_eq!(btf.member_bit_offset("inner", "a"), None);
        let e = btf.enum_values(&["E_TWO", "E_NONE"]);
        assert_eq!(e.get("E_TWO"), Some(&2));
        assert_eq!(e.len(), 1);
    }

    #[test]
    fn damaged_btf_is_an_error_not_a_panic() {
        let good = sample();
        for cut in 0..good.len() {
            let _ = Btf::parse(good[..cut].to_vec());
        }
        let mut bad = good.clone();
        bad[0] ^= 0xff;
        assert!(Btf::parse(bad).is_err());
        // An unknown kind.
        let mut bad = good;
        bad[24 + 7] = 0x1f;
        assert!(Btf::parse(bad).is_err());
    }

    #[test]
    fn the_running_kernel_has_what_the_daemon_reads() {
        let Ok(btf) = Btf::from_file("/sys/kernel/btf/vmlinux") else {
            return; // a kernel without BTF: the daemon says so at run time
        };
        assert!(btf.member_offset("task_struct", "nsproxy").is_some());
        assert!(btf.member_offset("sock_common", "skc_family").is_some());
        assert!(
            btf.member_bit_offset("sock_common", "skc_reuseport")
                .is_some()
        );
    }
}
