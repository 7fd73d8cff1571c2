//! JSON for the records that come by the hundred thousand a second (`bind`,
//! `listen`, `connect`), written straight into the batch. serde_json's
//! generic path escaped every key of every record and wrote the flattened
//! process as a map: most of the daemon's time per record in a bind storm.
//! The serde derives in `schema` stay the definition of every line: the
//! tests check that this writes the same bytes as serde_json for any record.

use std::sync::Arc;

use crate::schema::{Bind, BindOptions, Event, Explain, Line, Process, SockCall};

/// The last explanation written, and its JSON: the failures of a storm
/// that repeat one request share one (see `explain::Verdicts`).
#[derive(Default)]
pub struct LastExplain(Option<(Arc<Explain>, Vec<u8>)>);

impl LastExplain {
    fn write(&mut self, buf: &mut Vec<u8>, e: &Arc<Explain>) {
        match &self.0 {
            Some((last, json)) if Arc::ptr_eq(last, e) => buf.extend_from_slice(json),
            _ => {
                let json = serde_json::to_vec(&**e).expect("records serialize");
                buf.extend_from_slice(&json);
                self.0 = Some((e.clone(), json));
            }
        }
    }
}

/// Writes `line` and returns true if it is of a kind written here; else
/// writes nothing (the caller uses serde_json).
pub fn write(buf: &mut Vec<u8>, last: &mut LastExplain, line: &Line) -> bool {
    let (name, call) = match &line.event {
        Event::Bind(b) => ("bind", Call::Bind(b)),
        Event::Listen(c) => ("listen", Call::Sock(c)),
        Event::Connect(c) => ("connect", Call::Sock(c)),
        _ => return false,
    };
    // One growth check for the whole line, not one per piece.
    buf.reserve(LINE_BYTES);
    let mut w = Object::begin(buf);
    w.key("v").uint(u64::from(line.v));
    w.key("ts").str(&line.ts);
    w.key("event").str(name);
    match call {
        Call::Bind(b) => bind(&mut w, last, b),
        Call::Sock(c) => sock_call(&mut w, last, c),
    }
    w.end();
    true
}

/// More than a bind line takes without its explanation and command line.
const LINE_BYTES: usize = 1024;

enum Call<'a> {
    Bind(&'a Bind),
    Sock(&'a SockCall),
}

fn bind(w: &mut Object, last: &mut LastExplain, b: &Bind) {
    process(w, &b.process);
    w.key("fd").int(i64::from(b.fd));
    w.key("family").opt_str(b.family.as_deref());
    w.key("proto").opt_str(b.proto.as_deref());
    w.key("addr").opt_str(b.addr.as_deref());
    w.key("port").opt_uint(b.port.map(u64::from));
    w.key("bound_port").opt_uint(b.bound_port.map(u64::from));
    w.key("options");
    options(w.buf, &b.options);
    w.key("ret").int(b.ret);
    w.key("errno").opt_str(b.errno.as_deref());
    w.key("latency_ns").opt_uint(b.latency_ns);
    w.key("sock_cookie").opt_uint(b.sock_cookie);
    w.key("sock_ino").opt_uint(b.sock_ino);
    if let Some(e) = &b.explain {
        last.write(w.key("explain").buf, e);
    }
}

fn sock_call(w: &mut Object, last: &mut LastExplain, c: &SockCall) {
    process(w, &c.process);
    w.key("fd").int(i64::from(c.fd));
    w.key("family").opt_str(c.family.as_deref());
    w.key("laddr").opt_str(c.laddr.as_deref());
    w.key("lport").opt_uint(c.lport.map(u64::from));
    w.key("daddr").opt_str(c.daddr.as_deref());
    w.key("dport").opt_uint(c.dport.map(u64::from));
    w.key("ret").int(c.ret);
    w.key("errno").opt_str(c.errno.as_deref());
    w.key("latency_ns").opt_uint(c.latency_ns);
    if let Some(e) = &c.explain {
        last.write(w.key("explain").buf, e);
    }
}

/// The process's fields, flattened into the record.
fn process(w: &mut Object, p: &Process) {
    w.key("pid").uint(u64::from(p.pid));
    w.key("tid").uint(u64::from(p.tid));
    w.key("comm").str(&p.comm);
    w.key("uid").uint(u64::from(p.uid));
    w.key("cgroup_id").uint(p.cgroup_id);
    w.key("cgroup").opt_str(p.cgroup.as_deref());
    w.key("container_id").opt_str(p.container_id.as_deref());
    w.key("unit").opt_str(p.unit.as_deref());
    w.key("ppid").opt_uint(p.ppid.map(u64::from));
    w.key("cmdline").opt_str(p.cmdline.as_deref());
    w.key("netns").opt_uint(p.netns.map(u64::from));
}

fn options(buf: &mut Vec<u8>, o: &BindOptions) {
    let mut w = Object::begin(buf);
    w.key("reuseaddr").opt_bool(o.reuseaddr);
    w.key("reuseport").opt_bool(o.reuseport);
    w.key("freebind").opt_bool(o.freebind);
    w.key("transparent").opt_bool(o.transparent);
    w.key("bind_address_no_port")
        .opt_bool(o.bind_address_no_port);
    w.key("bound_dev_if")
        .opt_uint(o.bound_dev_if.map(u64::from));
    w.end();
}

/// A JSON object being written: `key` then one value, in turn.
struct Object<'a> {
    buf: &'a mut Vec<u8>,
    first: bool,
}

impl<'a> Object<'a> {
    fn begin(buf: &'a mut Vec<u8>) -> Object<'a> {
        buf.push(b'{');
        Object { buf, first: true }
    }

    fn end(self) {
        self.buf.push(b'}');
    }

    /// A key of ours: plain ASCII that needs no escaping.
    #[inline(always)]
    fn key(&mut self, key: &'static str) -> &mut Self {
        debug_assert!(!needs_escape(key.as_bytes()), "{key}");
        if !self.first {
            self.buf.push(b',');
        }
        self.first = false;
        self.buf.push(b'"');
        self.buf.extend_from_slice(key.as_bytes());
        self.buf.extend_from_slice(b"\":");
        self
    }

    #[inline(always)]
    fn uint(&mut self, n: u64) {
        self.buf
            .extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
    }

    #[inline(always)]
    fn int(&mut self, n: i64) {
        self.buf
            .extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
    }

    #[inline(always)]
    fn str(&mut self, s: &str) {
        if needs_escape(s.as_bytes()) {
            self.serde(s);
        } else {
            self.buf.push(b'"');
            self.buf.extend_from_slice(s.as_bytes());
            self.buf.push(b'"');
        }
    }

    #[inline(always)]
    fn null(&mut self) {
        self.buf.extend_from_slice(b"null");
    }

    #[inline(always)]
    fn opt_str(&mut self, s: Option<&str>) {
        match s {
            Some(s) => self.str(s),
            None => self.null(),
        }
    }

    #[inline(always)]
    fn opt_uint(&mut self, n: Option<u64>) {
        match n {
            Some(n) => self.uint(n),
            None => self.null(),
        }
    }

    #[inline(always)]
    fn opt_bool(&mut self, b: Option<bool>) {
        self.buf.extend_from_slice(match b {
            Some(true) => b"true",
            Some(false) => b"false",
            None => b"null",
        });
    }

    /// A value serde_json writes (a rare one, or a string to escape).
    fn serde<T: serde::Serialize + ?Sized>(&mut self, value: &T) {
        serde_json::to_writer(&mut *self.buf, value).expect("records serialize");
    }
}

/// What JSON escapes in a string: `"`, `\` and control characters.
fn needs_escape(s: &[u8]) -> bool {
    s.iter().any(|&b| b < 0x20 || b == b'"' || b == b'\\')
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use observer_common::{BindRecord, Kind, sockcall::Call};
    use proptest::prelude::*;

    use super::*;
    use crate::{
        clock::Clock,
        explain::rules,
        schema::{Explain, Rule},
    };

    fn same_as_serde(line: &Line) {
        let mut fast = Vec::new();
        assert!(write(&mut fast, &mut LastExplain::default(), line));
        let slow = serde_json::to_vec(line).unwrap();
        assert_eq!(
            String::from_utf8_lossy(&fast),
            String::from_utf8_lossy(&slow)
        );
    }

    /// Text a process can put in its name or command line.
    fn text() -> impl Strategy<Value = String> {
        prop_oneof![
            "[a-z0-9 ./-]{0,20}",
            any::<String>(),
            Just("quote\" back\\slash\ttab\u{1}\u{7f}é".to_owned()),
        ]
    }

    proptest! {
        /// Any bind record, with any names the stream fills in, reads the same.
        #[test]
        fn a_bind_is_written_as_serde_json_writes_it(
            payload in proptest::collection::vec(any::<u8>(), Kind::Bind.record_size()),
            comm in text(), cmdline in proptest::option::of(text()),
            cgroup in proptest::option::of(text()), ppid in proptest::option::of(any::<u32>()),
        ) {
            let mut bytes = payload;
            bytes[..4].copy_from_slice(&(Kind::Bind as u32).to_ne_bytes());
            let observer_common::decode::Record::Bind(r) =
                observer_common::decode::decode(&bytes).expect("right size")
            else {
                panic!("a bind record")
            };
            let mut b = Bind::from_record(&r);
            b.process.comm = comm;
            b.process.cmdline = cmdline.map(Arc::from);
            b.process.cgroup = cgroup.map(Arc::from);
            b.process.ppid = ppid;
            same_as_serde(&Line::at(&Clock::with_offset(0), r.header.ktime_ns, Event::Bind(b)));
        }

        #[test]
        fn a_listen_or_connect_is_written_as_serde_json_writes_it(
            payload in proptest::collection::vec(any::<u8>(), Kind::SockCall.record_size()),
            listen in any::<bool>(),
        ) {
            let mut bytes = payload;
            bytes[..4].copy_from_slice(&(Kind::SockCall as u32).to_ne_bytes());
            let observer_common::decode::Record::SockCall(mut r) =
                observer_common::decode::decode(&bytes).expect("right size")
            else {
                panic!("a call record")
            };
            r.call = if listen { Call::Listen } else { Call::Connect } as u32;
            same_as_serde(&Line::at(&Clock::with_offset(0), 7, Event::of_call(&r)));
        }
    }

    #[test]
    fn explained_binds_are_written_as_serde_json_writes_them() {
        let explained = |rule, hint: &str| {
            let mut holder = rules::holder(rules::TCP, 6, "127.0.0.1:5700", false, false, 0);
            holder.comm = Some("python3".into());
            Arc::new(Explain {
                rule,
                hint: hint.into(),
                blockers: vec![holder],
            })
        };
        let line = |e: &Arc<Explain>| {
            let mut b = Bind::from_record(&BindRecord::zeroed());
            b.explain = Some(e.clone());
            Line::at(&Clock::with_offset(0), 1, Event::Bind(b))
        };
        let first = explained(Rule::TimeWaitWithoutReuseaddr, "a \"hint\"");
        let second = explained(Rule::ListenerConflict, "another");
        // One explanation shared by two lines, then another: each line as serde writes it.
        let mut last = LastExplain::default();
        for e in [&first, &first, &second, &first] {
            let mut fast = Vec::new();
            assert!(write(&mut fast, &mut last, &line(e)));
            assert_eq!(fast, serde_json::to_vec(&line(e)).unwrap());
        }
    }

    #[test]
    fn other_records_are_left_to_serde() {
        let line = Line::at(
            &Clock::with_offset(0),
            1,
            Event::Lost(crate::schema::Lost {
                count: 1,
                cause: "ring_buffer",
            }),
        );
        let mut buf = Vec::new();
        assert!(!write(&mut buf, &mut LastExplain::default(), &line));
        assert!(buf.is_empty());
    }
}
