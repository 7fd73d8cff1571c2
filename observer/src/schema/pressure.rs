//! `port_pressure`: a pair (a local address, or a destination) of a network
//! namespace crossed 80 % or 95 % of its ephemeral port range, up or back
//! down (built by `crate::pressure`).

use serde::Serialize;

/// A process holding ports of the pair, and how many.
#[derive(Serialize, Debug, Clone, PartialEq, Eq)]
pub struct PressureHolder {
    /// `null` for the sockets no process owns: TIME_WAIT, orphans.
    pub pid: Option<u32>,
    pub comm: Option<String>,
    pub cmdline: Option<String>,
    /// Ports of the pair its sockets hold.
    pub count: u32,
}

#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct PortPressure {
    pub netns: u32,
    /// `tcp` or `udp`: each has ports of its own.
    pub proto: &'static str,
    /// `local`: ports held on `addr` (what `bind(addr:0)` needs one of);
    /// `destination`: ports of connections to `addr:port` (what `connect()`
    /// to it needs one of).
    pub scope: &'static str,
    pub addr: String,
    /// The destination's port; `null` for `local`.
    pub port: Option<u16>,
    /// Distinct ports of the range held.
    pub in_use: u32,
    /// Ports of the range (`ip_local_port_range`) less the reserved ones
    /// (`ip_local_reserved_ports`), as the namespace sees them.
    pub range: u32,
    pub range_low: u16,
    pub range_high: u16,
    pub reserved: u32,
    /// `in_use / range`, in percent (one decimal, rounded down).
    pub percent: f64,
    /// 0 (below 80 %), 80 or 95: now and before.
    pub level: u8,
    pub previous: u8,
    /// At most 5, most ports first.
    pub holders: Vec<PressureHolder>,
}

impl PortPressure {
    /// A complete record, for the README test.
    #[cfg(test)]
    pub fn example() -> PortPressure {
        PortPressure {
            netns: 1,
            proto: "tcp",
            scope: "destination",
            addr: "127.0.0.1".into(),
            port: Some(7000),
            in_use: 16,
            range: 20,
            range_low: 40000,
            range_high: 40019,
            reserved: 0,
            percent: 80.0,
            level: 80,
            previous: 0,
            holders: vec![PressureHolder {
                pid: Some(1),
                comm: Some("c".into()),
                cmdline: Some("c".into()),
                count: 16,
            }],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_pressure_json_shape() {
        let line = crate::schema::Line::at(
            &crate::clock::Clock::with_offset(0),
            1,
            crate::schema::Event::PortPressure(PortPressure::example()),
        );
        assert_eq!(
            serde_json::to_string(&line).unwrap(),
            r#"{"v":1,"ts":"1970-01-01T00:00:00.000000001Z","event":"port_pressure","netns":1,"proto":"tcp","scope":"destination","addr":"127.0.0.1","port":7000,"in_use":16,"range":20,"range_low":40000,"range_high":40019,"reserved":0,"percent":80.0,"level":80,"previous":0,"holders":[{"pid":1,"comm":"c","cmdline":"c","count":16}]}"#
        );
        let mut local = PortPressure::example();
        (local.scope, local.port, local.holders) = ("local", None, Vec::new());
        let v = serde_json::to_value(&local).unwrap();
        assert_eq!(
            (v["port"].is_null(), v["holders"].as_array().map(Vec::len)),
            (true, Some(0))
        );
    }
}
