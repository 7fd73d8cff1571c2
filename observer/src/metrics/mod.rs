//! `observer run --metrics ADDR:PORT`: the stream as Prometheus metrics.
//!
//! Counted in one place, where `Stream::write` hands a record to the output
//! (after the filters and the explainer, so they count what was written) and
//! where `Stream::say` tells a loss; the daemon's own figures are read at each
//! scrape (`Own`). `http` serves them. Labels are bounded: names from finite
//! sets (errnos, protocols, states, rules, causes), ports only on failures and
//! at most `MAX_PORTS` of them, never a pid or an address.

pub mod http;

use std::{
    collections::HashSet,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeCounterValue, EncodeLabelSet, EncodeMetric},
    metrics::{
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::{ConstGauge, Gauge},
    },
    registry::Registry,
};

use crate::{
    filter::Filter,
    output::Tally,
    pressure::worker::{GAUGE_PAIRS, PairGauge, Top},
    schema::{Bind, Event, LOST_CAUSES},
};

/// Distinct ports one metric labels; the others are counted as `port="other"`.
pub const MAX_PORTS: usize = 64;

/// The bind failures counted by port and rule: the ones an operator acts on.
const PORT_ERRNOS: [&str; 3] = ["EADDRINUSE", "EACCES", "EADDRNOTAVAIL"];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BindLabels {
    result: String,
    proto: String,
    family: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FailureLabels {
    errno: String,
    port: String,
    rule: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallLabels {
    call: &'static str,
    errno: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    from: &'static str,
    to: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EnteredLabels {
    preexisting: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ExitedLabels {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EventLabels {
    event: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct InfoLabels {
    version: &'static str,
    filtered: &'static str,
    filter: String,
}

/// The families the stream feeds; the registry (shared with the server) holds
/// clones of the same counters.
pub struct Metrics {
    registry: Arc<Registry>,
    binds: Family<BindLabels, Counter>,
    bind_failures: Family<FailureLabels, Counter>,
    failure_ports: PortCap,
    calls: Family<CallLabels, Counter>,
    tcp_states: Family<StateLabels, Counter>,
    time_wait_open: Gauge,
    time_wait_entered: Family<EnteredLabels, Counter>,
    time_wait_exited: Family<ExitedLabels, Counter>,
    records: Family<EventLabels, Counter>,
    own: Arc<Own>,
    pressure: Arc<Top>,
}

impl Metrics {
    pub fn new(filter: &Filter, ring_bytes: u32, tally: Tally) -> Metrics {
        let mut r = Registry::default();
        let described = filter.describe();
        let info = Family::<InfoLabels, Gauge>::default();
        info.get_or_create(&InfoLabels {
            version: env!("CARGO_PKG_VERSION"),
            filtered: if described.is_empty() {
                "false"
            } else {
                "true"
            },
            filter: described,
        })
        .set(1);
        r.register(
            "observer_info",
            "Always 1: the version, and whether filters (named in `filter`) keep records out of the stream and of these metrics",
            info,
        );
        let m = Metrics {
            registry: Arc::default(),
            binds: Family::default(),
            bind_failures: Family::default(),
            failure_ports: PortCap::default(),
            calls: Family::default(),
            tcp_states: Family::default(),
            time_wait_open: Gauge::default(),
            time_wait_entered: Family::default(),
            time_wait_exited: Family::default(),
            records: Family::default(),
            own: Arc::new(Own {
                ring_bytes: u64::from(ring_bytes),
                tally,
                lost: Default::default(),
            }),
            pressure: Arc::default(),
        };
        r.register(
            "observer_binds",
            "bind() calls written to the stream, by result (the errno name, or ok), protocol and address family (bounded: finite sets)",
            m.binds.clone(),
        );
        r.register(
            "observer_bind_failures",
            "bind() failures with EADDRINUSE, EACCES or EADDRNOTAVAIL, by errno, requested port and explain rule (none when unexplained); bounded: at most 64 distinct ports, the rest as port=\"other\"",
            m.bind_failures.clone(),
        );
        r.register(
            "observer_call_failures",
            "Failed listen() and connect() calls, by call and errno name (bounded: finite sets)",
            m.calls.clone(),
        );
        r.register(
            "observer_tcp_state_changes",
            "TCP state changes, by old (from) and new (to) state (bounded: the TCP states)",
            m.tcp_states.clone(),
        );
        r.register(
            "observer_time_wait_sockets",
            "TIME_WAIT sockets open now: enters minus exits written to the stream (preexisting ones included)",
            m.time_wait_open.clone(),
        );
        r.register(
            "observer_time_wait_entered",
            "TIME_WAIT sockets entered, by whether they were there before the observer started",
            m.time_wait_entered.clone(),
        );
        r.register(
            "observer_time_wait_exited",
            "TIME_WAIT sockets gone, by reason (expired, reused, killed)",
            m.time_wait_exited.clone(),
        );
        r.register(
            "observer_records",
            "Records handed to the output, by event kind (bounded: the record kinds)",
            m.records.clone(),
        );
        r.register_collector(Box::new(m.own.clone()));
        r.register_collector(Box::new(Pressure(m.pressure.clone())));
        Metrics {
            registry: Arc::new(r),
            ..m
        }
    }

    /// Where the port-pressure worker puts the worst pairs.
    pub fn pressure_top(&self) -> Arc<Top> {
        self.pressure.clone()
    }

    /// What the server encodes.
    pub fn registry(&self) -> Arc<Registry> {
        self.registry.clone()
    }

    /// One record as the stream wrote it (explained, after the filters), or
    /// one of the daemon's own.
    pub fn observe(&mut self, e: &Event) {
        self.records
            .get_or_create(&EventLabels { event: e.name() })
            .inc();
        match e {
            Event::Bind(b) => {
                self.binds.get_or_create(&bind_labels(b)).inc();
                if let Some(l) = failure_labels(b, &mut self.failure_ports) {
                    self.bind_failures.get_or_create(&l).inc();
                }
            }
            Event::Listen(c) | Event::Connect(c) => {
                let call = if matches!(e, Event::Listen(_)) {
                    "listen"
                } else {
                    "connect"
                };
                let errno = c.errno.as_deref().unwrap_or("ok").to_owned();
                self.calls.get_or_create(&CallLabels { call, errno }).inc();
            }
            Event::TcpState(t) => {
                let l = StateLabels {
                    from: t.old,
                    to: t.new,
                };
                self.tcp_states.get_or_create(&l).inc();
            }
            Event::TimeWaitEnter(t) => {
                self.time_wait_open.inc();
                let preexisting = if t.preexisting { "true" } else { "false" };
                self.time_wait_entered
                    .get_or_create(&EnteredLabels { preexisting })
                    .inc();
            }
            Event::TimeWaitExit(t) => {
                // Never below zero: an exit whose enter was not written.
                if self.time_wait_open.get() > 0 {
                    self.time_wait_open.dec();
                }
                self.time_wait_exited
                    .get_or_create(&ExitedLabels { reason: t.reason })
                    .inc();
            }
            Event::Lost(l) => {
                if let Some(i) = LOST_CAUSES.iter().position(|c| *c == l.cause) {
                    self.own.lost[i].fetch_add(l.count, Ordering::Relaxed);
                }
            }
            Event::PortPressure(_)
            | Event::ObserverStart(_)
            | Event::Stats(_)
            | Event::ObserverStop(_) => {}
        }
    }
}

fn bind_labels(b: &Bind) -> BindLabels {
    BindLabels {
        result: b.errno.as_deref().unwrap_or("ok").to_owned(),
        proto: b.proto.as_deref().unwrap_or("none").to_owned(),
        family: b.family.as_deref().unwrap_or("unknown").to_owned(),
    }
}

/// The port-and-rule labels of a failure worth them, else `None`.
fn failure_labels(b: &Bind, ports: &mut PortCap) -> Option<FailureLabels> {
    let errno = b.errno.as_deref().filter(|e| PORT_ERRNOS.contains(e))?;
    // The rule's stable id, as the stream spells it.
    let rule = b
        .explain
        .as_ref()
        .and_then(|x| serde_json::to_value(x.rule).ok())
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_else(|| "none".into());
    Some(FailureLabels {
        errno: errno.to_owned(),
        port: ports.label(b.port),
        rule,
    })
}

/// The ports a metric has labelled: the first `MAX_PORTS` keep their number.
#[derive(Default)]
struct PortCap {
    seen: HashSet<u16>,
}

impl PortCap {
    fn label(&mut self, port: Option<u16>) -> String {
        let Some(p) = port else {
            return "none".into();
        };
        if self.seen.contains(&p) || self.seen.len() < MAX_PORTS {
            self.seen.insert(p);
            p.to_string()
        } else {
            "other".into()
        }
    }
}

/// The daemon's own figures, read at each scrape.
#[derive(Debug)]
struct Own {
    ring_bytes: u64,
    tally: Tally,
    /// `lost` records' counts, by `LOST_CAUSES` (`output`'s is the writer's,
    /// read from the output at scrape time).
    lost: [AtomicU64; LOST_CAUSES.len()],
}

impl Collector for Own {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        fn counter<N: EncodeCounterValue>(
            enc: &mut DescriptorEncoder,
            name: &str,
            help: &str,
            v: N,
        ) -> Result<(), std::fmt::Error> {
            let c = ConstCounter::new(v);
            c.encode(enc.encode_descriptor(name, help, None, c.metric_type())?)
        }
        let gauge = |enc: &mut DescriptorEncoder, name: &str, help: &str, v: i64| {
            let g = ConstGauge::new(v);
            g.encode(enc.encode_descriptor(name, help, None, g.metric_type())?)
        };
        let (cpu, rss) = usage();
        counter(
            &mut enc,
            "process_cpu_seconds",
            "CPU time of the observer daemon (user and system), in seconds",
            cpu,
        )?;
        gauge(
            &mut enc,
            "process_resident_memory_bytes",
            "Resident memory of the observer daemon, in bytes",
            rss as i64,
        )?;
        gauge(
            &mut enc,
            "observer_ring_buffer_bytes",
            "Size of the kernel ring buffer (--ring-buffer), in bytes",
            self.ring_bytes as i64,
        )?;
        counter(
            &mut enc,
            "observer_records_written",
            "Records written to the output (stdout or --output)",
            self.tally.written(),
        )?;
        let mut lost = enc.encode_descriptor(
            "observer_lost",
            "Records lost, by cause, as the stream's lost records tell them (output: not written)",
            None,
            prometheus_client::metrics::MetricType::Counter,
        )?;
        let output = self.tally.lost();
        for (cause, n) in LOST_CAUSES.iter().zip(&self.lost).map(|(c, n)| {
            let n = if *c == "output" {
                output
            } else {
                n.load(Ordering::Relaxed)
            };
            (*c, n)
        }) {
            let labels = [("cause", cause)];
            ConstCounter::new(n).encode(lost.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

/// The worst `GAUGE_PAIRS` pairs of ephemeral-port pressure, read at each
/// scrape from the worker's last counts. Their labels name a namespace and an
/// address: bounded because at most `GAUGE_PAIRS` series exist at a time.
#[derive(Debug)]
struct Pressure(Arc<Top>);

impl Collector for Pressure {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let worst = self.0.worst();
        debug_assert!(worst.len() <= GAUGE_PAIRS);
        type Value = fn(&PairGauge) -> f64;
        let families: [(&str, &str, Value); 3] = [
            (
                "observer_ephemeral_ports_in_use",
                "Ports of the ephemeral range held, for the 8 pairs (local address or destination, per protocol and network namespace) nearest to running out",
                |g| f64::from(g.in_use),
            ),
            (
                "observer_ephemeral_ports_range",
                "Ports of the ephemeral range (ip_local_port_range less ip_local_reserved_ports) of the same pairs' namespaces",
                |g| f64::from(g.range),
            ),
            (
                "observer_ephemeral_port_pressure_ratio",
                "in_use / range of the same pairs (1: none left)",
                |g| g.ratio(),
            ),
        ];
        for (name, help, value) in families {
            let mut e = enc.encode_descriptor(
                name,
                help,
                None,
                prometheus_client::metrics::MetricType::Gauge,
            )?;
            for g in &worst {
                let netns = g.netns.to_string();
                let labels = [
                    ("netns", netns.as_str()),
                    ("proto", g.proto),
                    ("scope", g.scope),
                    ("pair", g.pair.as_str()),
                ];
                ConstGauge::new(value(g)).encode(e.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}

/// The process's CPU seconds and resident bytes.
fn usage() -> (f64, u64) {
    use nix::sys::resource::{UsageWho, getrusage};
    let cpu = getrusage(UsageWho::RUSAGE_SELF).map_or(0.0, |u| {
        let s = |t: nix::sys::time::TimeVal| t.tv_sec() as f64 + t.tv_usec() as f64 / 1e6;
        s(u.user_time()) + s(u.system_time())
    });
    (cpu, crate::stream::rss_kb() * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    use observer_common::{BindRecord, bind::flags};
    use prometheus_client::encoding::{prometheus_text, text};

    use crate::schema::{Explain, Lost, Rule};

    fn metrics(filter: &Filter) -> Metrics {
        Metrics::new(filter, 1 << 20, Tally::default())
    }

    fn bind(ret: i64, port: u16) -> Bind {
        let mut r = BindRecord::zeroed();
        r.ret = ret;
        r.family = 2;
        r.sock_type = 1;
        r.protocol = 6;
        r.flags = flags::SOCKET | flags::SOCKADDR;
        r.sockaddr[..2].copy_from_slice(&2u16.to_ne_bytes());
        r.sockaddr[2..4].copy_from_slice(&port.to_be_bytes());
        r.sockaddr[4..8].copy_from_slice(&[127, 0, 0, 1]);
        r.addrlen = 16;
        Bind::from_record(&r)
    }

    fn exposition(m: &Metrics) -> String {
        let mut s = String::new();
        prometheus_text::encode(&mut s, &m.registry()).unwrap();
        s
    }

    #[test]
    fn binds_are_labelled_by_errno_name_proto_and_family() {
        assert_eq!(
            bind_labels(&bind(0, 80)),
            BindLabels {
                result: "ok".into(),
                proto: "tcp".into(),
                family: "inet".into()
            }
        );
        assert_eq!(bind_labels(&bind(-98, 80)).result, "EADDRINUSE");
        let mut unknown = bind(-9, 80);
        (unknown.proto, unknown.family) = (None, None);
        assert_eq!(
            (bind_labels(&unknown).proto, bind_labels(&unknown).family),
            ("none".into(), "unknown".into())
        );
    }

    #[test]
    fn failures_by_port_and_rule_only_for_the_errnos_that_name_a_port() {
        let mut ports = PortCap::default();
        assert_eq!(failure_labels(&bind(0, 80), &mut ports), None);
        assert_eq!(failure_labels(&bind(-22, 80), &mut ports), None);
        let mut b = bind(-98, 5700);
        b.explain = Some(std::sync::Arc::new(Explain {
            rule: Rule::TimeWaitWithoutReuseaddr,
            hint: String::new(),
            blockers: Vec::new(),
        }));
        assert_eq!(
            failure_labels(&b, &mut ports),
            Some(FailureLabels {
                errno: "EADDRINUSE".into(),
                port: "5700".into(),
                rule: "time_wait_without_reuseaddr".into()
            })
        );
        let l = failure_labels(&bind(-13, 80), &mut ports).unwrap();
        assert_eq!((l.errno.as_str(), l.rule.as_str()), ("EACCES", "none"));
    }

    #[test]
    fn the_65th_port_is_other() {
        let mut ports = PortCap::default();
        for p in 1..=MAX_PORTS as u16 {
            assert_eq!(ports.label(Some(p)), p.to_string());
        }
        assert_eq!(ports.label(Some(1000)), "other");
        // Ports seen before keep their label.
        assert_eq!(ports.label(Some(7)), "7");
        assert_eq!(ports.label(None), "none");

        // And in the metric itself: 65 ports, 65 series, one of them `other`.
        let mut m = metrics(&Filter::default());
        for p in 0..=MAX_PORTS as u16 {
            m.observe(&Event::Bind(bind(-98, 9000 + p)));
        }
        m.observe(&Event::Bind(bind(-98, 9999)));
        let text = exposition(&m);
        let series: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("observer_bind_failures_total{"))
            .collect();
        assert_eq!(series.len(), MAX_PORTS + 1, "{text}");
        assert!(
            text.contains(
                "observer_bind_failures_total{errno=\"EADDRINUSE\",port=\"other\",rule=\"none\"} 2"
            ),
            "{text}"
        );
    }

    #[test]
    fn exposition_in_both_formats() {
        let filter = Filter {
            netns: Some(1),
            ..Filter::default()
        };
        let mut m = metrics(&filter);
        m.observe(&Event::Bind(bind(-98, 5700)));
        m.observe(&Event::Lost(Lost {
            count: 3,
            cause: "ring_buffer",
        }));
        let text = exposition(&m);
        for want in [
            "# TYPE observer_binds_total counter",
            "observer_binds_total{result=\"EADDRINUSE\",proto=\"tcp\",family=\"inet\"} 1",
            "observer_lost_total{cause=\"ring_buffer\"} 3",
            "observer_lost_total{cause=\"output\"} 0",
            "observer_ring_buffer_bytes 1048576",
            "observer_records_written_total 0\n",
            "observer_records_total{event=\"bind\"} 1",
            &format!(
                "observer_info{{version=\"{}\",filtered=\"true\",filter=\"netns\"}} 1",
                env!("CARGO_PKG_VERSION")
            ),
        ] {
            assert!(text.contains(want), "{want}\n{text}");
        }
        let mut om = String::new();
        text::encode(&mut om, &m.registry()).unwrap();
        assert!(om.ends_with("# EOF\n"), "{om}");
        assert!(om.contains("# TYPE observer_binds counter"), "{om}");
    }
}
