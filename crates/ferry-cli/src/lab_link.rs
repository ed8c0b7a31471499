//! `ferry lab link HOST ...`: shape and break a namespaced lab host's
//! migration link, for tests, benchmarks and curious operators alike.
//!
//! - `--rate`: a tbf qdisc on both ends of the host's migration veth (the
//!   host's `mig`, and its port on the switch), so both directions run at
//!   the rate, as on a real link. (This kernel has tbf and htb, no netem.)
//! - `--loss`: iptables `statistic --mode random` DROP of packets in and
//!   out of `mig`, inside the host's namespace. Both ends of the veth first
//!   stop passing 64 KiB GSO packets (`gso_max_segs 1`), so that what is
//!   dropped is one frame of the MTU, as on a wire, not 45 at once.
//! - `--partition HOST2`: DROP of everything to and from HOST2's migration
//!   address, inside the host's namespace.
//! - `--down` / `--up`: the host's `mig` interface.
//! - `--clear`: all of the above undone.
//!
//! The iptables rules carry a comment naming what set them, so a new
//! `--loss` replaces the last one and `--clear` removes only the lab's.

use std::net::Ipv4Addr;
use std::process::Command;

use anyhow::{bail, Context, Result};
use ferry_types::HostName;

use crate::lab_netns::{LabNet, MIGRATION_IF};

/// What to do to a host's migration link.
#[derive(Debug, Clone, PartialEq)]
pub enum LinkChange {
    /// Bits per second, both directions.
    Rate(u64),
    /// Probability of dropping each packet, both directions.
    Loss(f64),
    Down,
    Up,
    Partition {
        peer: HostName,
        addr: Ipv4Addr,
    },
    Clear,
}

/// `1gbit`, `200mbit`, `2.5gbit`, `800kbit`, `64000bit`: bits per second
/// (tc's units, powers of ten).
pub fn parse_rate(s: &str) -> Result<u64> {
    let lower = s.trim().to_ascii_lowercase();
    let units = [("gbit", 1e9), ("mbit", 1e6), ("kbit", 1e3), ("bit", 1.0)];
    let Some((number, scale)) =
        units.iter().find_map(|(u, scale)| lower.strip_suffix(u).map(|n| (n, *scale)))
    else {
        bail!("rate {s:?} has no unit: write e.g. 1gbit, 200mbit or 800kbit");
    };
    let value: f64 =
        number.parse().with_context(|| format!("rate {s:?}: {number:?} is not a number"))?;
    let bits = value * scale;
    if !bits.is_finite() || bits < 8e3 {
        bail!("rate {s:?} is below 8kbit: a migration could not finish");
    }
    if bits > 100e9 {
        bail!("rate {s:?} is above 100gbit, faster than any veth here");
    }
    Ok(bits as u64)
}

/// `2%`, `0.5%`: the probability of dropping a packet.
pub fn parse_loss(s: &str) -> Result<f64> {
    let Some(number) = s.trim().strip_suffix('%') else {
        bail!("loss {s:?} must be a percentage, e.g. 2%");
    };
    let pct: f64 =
        number.trim().parse().with_context(|| format!("loss {s:?}: {number:?} is not a number"))?;
    if !(pct > 0.0 && pct < 100.0) {
        bail!("loss {s:?} must be above 0% and below 100% (use --down for 100%)");
    }
    Ok(pct / 100.0)
}

/// The token bucket: 1 ms worth of bytes, and never less than 64 KiB
/// (veths pass 64 KiB GSO packets; a bucket smaller than a packet would
/// stall it).
pub fn burst_bytes(bits_per_s: u64) -> u64 {
    (bits_per_s / 8 / 1000).max(64 * 1024)
}

/// One command, run inside a namespace.
#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    pub netns: String,
    pub argv: Vec<String>,
    /// Undoing what may not have been done (`tc qdisc del` without a qdisc).
    pub may_fail: bool,
}

fn step(netns: &str, argv: &[&str], may_fail: bool) -> Step {
    Step { netns: netns.to_owned(), argv: argv.iter().map(|a| a.to_string()).collect(), may_fail }
}

/// The comment that marks the lab's iptables rules of one kind.
pub fn tag(change: &LinkChange) -> Option<String> {
    match change {
        LinkChange::Loss(_) => Some("ferry-loss".into()),
        LinkChange::Partition { peer, .. } => Some(format!("ferry-partition-{peer}")),
        _ => None,
    }
}

/// Deletions of the rules in an `iptables -S` listing whose comment starts
/// with `tag` (all of the lab's rules with tag "ferry-").
pub fn deletions(netns: &str, listing: &str, tag: &str) -> Vec<Step> {
    listing
        .lines()
        .filter(|l| l.starts_with("-A ") && l.contains(&format!("--comment {tag}")))
        .map(|l| {
            let mut argv = vec!["iptables".to_owned(), "-w".to_owned(), "-D".to_owned()];
            argv.extend(l[3..].split_whitespace().map(str::to_owned));
            Step { netns: netns.to_owned(), argv, may_fail: false }
        })
        .collect()
}

/// The commands that make `change` on `host`'s link (after the deletions
/// of the rules it replaces).
pub fn steps(net: &LabNet, host: &HostName, change: &LinkChange) -> Result<Vec<Step>> {
    let ns = net.host(host)?.netns.as_str();
    let port = format!("{host}-{MIGRATION_IF}");
    let ends = [(ns, MIGRATION_IF), (net.switch.as_str(), port.as_str())];
    let comment = tag(change).unwrap_or_default();
    let drop_rule = |chain: &str, matches: &[&str]| {
        let mut argv = vec!["iptables", "-w", "-A", chain];
        argv.extend(matches);
        argv.extend(["-m", "comment", "--comment", &comment, "-j", "DROP"]);
        step(ns, &argv, false)
    };
    Ok(match change {
        LinkChange::Rate(bits) => {
            let (rate, burst) = (format!("{bits}bit"), burst_bytes(*bits).to_string());
            ends.iter()
                .map(|(ns, dev)| {
                    let argv = ["tc", "qdisc", "replace", "dev", dev, "root", "tbf"];
                    let argv = [&argv[..], &["rate", &rate, "burst", &burst, "latency", "50ms"]];
                    step(ns, &argv.concat(), false)
                })
                .collect()
        }
        LinkChange::Loss(p) => {
            let p = format!("{p:.6}");
            let random = ["-m", "statistic", "--mode", "random", "--probability", &p];
            let mut all = gso_max_segs(&ends, "1");
            all.push(drop_rule("INPUT", &[&["-i", MIGRATION_IF][..], &random].concat()));
            all.push(drop_rule("OUTPUT", &[&["-o", MIGRATION_IF][..], &random].concat()));
            all
        }
        LinkChange::Partition { addr, .. } => {
            let addr = addr.to_string();
            vec![drop_rule("INPUT", &["-s", &addr]), drop_rule("OUTPUT", &["-d", &addr])]
        }
        LinkChange::Down => vec![step(ns, &["ip", "link", "set", MIGRATION_IF, "down"], false)],
        LinkChange::Up => vec![step(ns, &["ip", "link", "set", MIGRATION_IF, "up"], false)],
        LinkChange::Clear => {
            let mut all: Vec<Step> = ends
                .iter()
                .map(|(ns, dev)| step(ns, &["tc", "qdisc", "del", "dev", dev, "root"], true))
                .collect();
            all.extend(gso_max_segs(&ends, GSO_MAX_SEGS_DEFAULT));
            all.push(step(ns, &["ip", "link", "set", MIGRATION_IF, "up"], false));
            all
        }
    })
}

/// A veth's default: GSO packets of any number of segments.
const GSO_MAX_SEGS_DEFAULT: &str = "65535";

/// Largest GSO packet (in segments) each end passes; a larger one is cut
/// into frames of the MTU before it leaves that end.
fn gso_max_segs(ends: &[(&str, &str)], segs: &str) -> Vec<Step> {
    ends.iter()
        .map(|(ns, dev)| step(ns, &["ip", "link", "set", dev, "gso_max_segs", segs], false))
        .collect()
}

/// What `change` set, in words.
pub fn describe(host: &HostName, change: &LinkChange) -> String {
    match change {
        LinkChange::Rate(bits) => format!(
            "{host}: migration link shaped to {} Mbit/s each way (tbf, burst {} B)",
            *bits as f64 / 1e6,
            burst_bytes(*bits)
        ),
        LinkChange::Loss(p) => format!(
            "{host}: dropping {}% of the frames in and out of its migration link \
             (no GSO on it, so a frame is one MTU)",
            p * 100.0
        ),
        LinkChange::Down => format!("{host}: migration link down"),
        LinkChange::Up => format!("{host}: migration link up"),
        LinkChange::Partition { peer, addr } => {
            format!("{host}: partitioned from {peer} (dropping all to and from {addr})")
        }
        LinkChange::Clear => {
            format!("{host}: migration link restored (no shaping, no drops, up)")
        }
    }
}

fn run(s: &Step) -> Result<String> {
    let o = Command::new("ip")
        .args(["netns", "exec", &s.netns])
        .args(&s.argv)
        .output()
        .with_context(|| format!("cannot run {} in {}", s.argv[0], s.netns))?;
    if !o.status.success() && !s.may_fail {
        bail!(
            "`{}` in {} failed: {}",
            s.argv.join(" "),
            s.netns,
            String::from_utf8_lossy(&o.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&o.stdout).into_owned())
}

/// Make `change` on `host`'s migration link.
pub fn apply(net: &LabNet, host: &HostName, change: &LinkChange) -> Result<String> {
    let ns = &net.host(host)?.netns;
    // The rules this change replaces: its own kind's, or all the lab's.
    let replaced = match change {
        LinkChange::Clear => Some("ferry-".to_owned()),
        other => tag(other),
    };
    if let Some(tag) = replaced {
        let listing = run(&step(ns, &["iptables", "-w", "-S"], false))?;
        for d in deletions(ns, &listing, &tag) {
            run(&d)?;
        }
    }
    for s in steps(net, host, change)? {
        run(&s)?;
    }
    Ok(describe(host, change))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lab() -> LabNet {
        let names: Vec<HostName> = ["host1", "host2"].iter().map(|n| n.parse().unwrap()).collect();
        crate::lab_netns::plan(std::path::Path::new("/tmp/lab"), &names)
    }

    #[test]
    fn rates_are_read_in_tc_units() {
        assert_eq!(parse_rate("1gbit").unwrap(), 1_000_000_000);
        assert_eq!(parse_rate("200mbit").unwrap(), 200_000_000);
        assert_eq!(parse_rate("2.5Gbit").unwrap(), 2_500_000_000);
        assert_eq!(parse_rate("64000bit").unwrap(), 64_000);
        for (bad, why) in [
            ("1g", "no unit"),
            ("fastgbit", "not a number"),
            ("1bit", "below"),
            ("-5mbit", "below"),
            ("1000gbit", "above"),
        ] {
            let e = parse_rate(bad).unwrap_err().to_string();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn loss_is_a_percentage_strictly_between_0_and_100() {
        assert_eq!(parse_loss("2%").unwrap(), 0.02);
        assert_eq!(parse_loss("0.5%").unwrap(), 0.005);
        for (bad, why) in
            [("2", "percentage"), ("x%", "not a number"), ("0%", "above 0%"), ("100%", "below")]
        {
            let e = parse_loss(bad).unwrap_err().to_string();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn the_bucket_holds_a_millisecond_and_at_least_one_gso_packet() {
        assert_eq!(burst_bytes(10_000_000_000), 1_250_000);
        assert_eq!(burst_bytes(200_000_000), 64 * 1024);
    }

    #[test]
    fn a_rate_shapes_both_ends_of_the_hosts_migration_veth() {
        let net = lab();
        let host: HostName = "host2".parse().unwrap();
        let s = steps(&net, &host, &LinkChange::Rate(1_000_000_000)).unwrap();
        let ends: Vec<(&str, &str)> =
            s.iter().map(|s| (s.netns.as_str(), s.argv[4].as_str())).collect();
        assert_eq!(
            ends,
            [(net.hosts[1].netns.as_str(), "mig"), (net.switch.as_str(), "host2-mig")]
        );
        assert!(s.iter().all(|s| s.argv.join(" ").contains("tbf rate 1000000000bit")));
    }

    #[test]
    fn loss_and_partition_drop_only_on_the_migration_side() {
        let net = lab();
        let host: HostName = "host1".parse().unwrap();
        let loss = steps(&net, &host, &LinkChange::Loss(0.02)).unwrap();
        let text: Vec<String> = loss.iter().map(|s| s.argv.join(" ")).collect();
        assert_eq!(text[0], "ip link set mig gso_max_segs 1");
        assert_eq!(text[1], "ip link set host1-mig gso_max_segs 1");
        assert!(text[2].contains("-A INPUT -i mig") && text[3].contains("-A OUTPUT -o mig"));
        assert!(text[2..].iter().all(|t| t.contains("--probability 0.020000")));
        let peer = net.hosts[1].clone();
        let change = LinkChange::Partition { peer: peer.name, addr: peer.migration };
        let part: Vec<String> =
            steps(&net, &host, &change).unwrap().iter().map(|s| s.argv.join(" ")).collect();
        assert!(part[0].contains(&format!("-A INPUT -s {}", peer.migration)), "{part:?}");
        assert!(part[1].contains(&format!("-A OUTPUT -d {}", peer.migration)), "{part:?}");
        assert!(part.iter().all(|t| t.contains("--comment ferry-partition-host2")));
        assert!(steps(&net, &"host9".parse().unwrap(), &LinkChange::Down).is_err());
    }

    #[test]
    fn only_the_labs_tagged_rules_are_deleted() {
        let listing = "-P INPUT ACCEPT\n\
            -A INPUT -i mig -m statistic --mode random --probability 0.02000000004 -m comment --comment ferry-loss -j DROP\n\
            -A INPUT -s 10.0.0.1/32 -j DROP\n\
            -A OUTPUT -d 10.77.2.12/32 -m comment --comment ferry-partition-host2 -j DROP\n";
        let loss = deletions("ns", listing, "ferry-loss");
        assert_eq!(loss.len(), 1);
        assert_eq!(loss[0].argv[..5], ["iptables", "-w", "-D", "INPUT", "-i"]);
        assert_eq!(deletions("ns", listing, "ferry-").len(), 2);
    }
}
