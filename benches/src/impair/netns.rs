//! The two network namespaces and their TUN devices, set up and torn down with iproute2's
//! `ip`. Names carry the forwarder's pid (`blk<pid>a`, `blk<pid>b`), so a run that crashed
//! leaves names a later run recognises and removes.
//!
//! The TUN devices are created in the root namespace (the forwarder keeps their file
//! descriptors) and then moved with `ip link set DEV netns NS`: a TUN file descriptor keeps
//! working after its device changed namespace, so the forwarder never has to `setns`.

use std::net::Ipv4Addr;
use std::path::Path;
use std::process::Command;

use anyhow::{Context, bail};

/// MTU of both TUN devices (like Ethernet).
pub const MTU: u16 = 1500;

/// Packets the kernel may queue on a TUN device before the forwarder reads them.
const TX_QUEUE_LEN: u32 = 4096;

/// Names and addresses of one link, derived from a pid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Names {
    /// Namespace (and TUN device) of side A, the sending side in the benches.
    pub ns_a: String,
    /// Namespace (and TUN device) of side B, the receiving side.
    pub ns_b: String,
    /// Address of side A (`.1` of a /30).
    pub addr_a: Ipv4Addr,
    /// Address of side B (`.2` of the same /30).
    pub addr_b: Ipv4Addr,
}

impl Names {
    /// The names for a pid: a /30 inside 10.0.0.0/8 at `pid * 4` (Linux pids are below 2^22,
    /// so every pid has its own /30). The addresses exist only inside the two namespaces.
    pub fn for_pid(pid: u32) -> Names {
        let base = 0x0A00_0000 | ((pid & 0x003F_FFFF) << 2);
        Names {
            ns_a: format!("blk{pid}a"),
            ns_b: format!("blk{pid}b"),
            addr_a: Ipv4Addr::from(base + 1),
            addr_b: Ipv4Addr::from(base + 2),
        }
    }
}

/// The pid a link name carries, for `blk<pid>a` and `blk<pid>b`.
pub fn pid_of(name: &str) -> Option<u32> {
    let rest = name.strip_prefix("blk")?;
    let digits = rest.strip_suffix('a').or_else(|| rest.strip_suffix('b'))?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Why the forwarder cannot run here, if it cannot (not root, no TUN, no `ip`).
pub fn unsupported() -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        return Some("not root (network namespaces and TUN devices need root)".into());
    }
    if !Path::new("/dev/net/tun").exists() {
        return Some("no /dev/net/tun".into());
    }
    match Command::new("ip").arg("-V").output() {
        Ok(out) if out.status.success() => None,
        _ => Some("iproute2's `ip` is not installed".into()),
    }
}

/// Runs `ip ARGS`, failing with its stderr when it fails.
pub fn ip(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running ip")?;
    if !out.status.success() {
        bail!(
            "`ip {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// True when `pid` is a live baylink-bench (the owner of a `blk<pid>?` name).
fn owner_alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .is_ok_and(|comm| comm.trim() == "baylink-bench")
}

/// Removes namespaces and devices left by forwarders that died without cleaning up (a
/// failure to remove one is reported on stderr, not fatal). Returns the names removed.
pub fn remove_stale() -> anyhow::Result<Vec<String>> {
    let mut removed = Vec::new();
    for line in ip(&["netns", "list"])?.lines() {
        let Some(name) = line.split_whitespace().next() else {
            continue;
        };
        if pid_of(name).is_some_and(|pid| !owner_alive(pid)) {
            // Another forwarder starting at the same time may have removed it first.
            match ip(&["netns", "del", name]) {
                Ok(_) => removed.push(name.to_owned()),
                Err(e) => eprintln!("impair: stale {name}: {e:#}"),
            }
        }
    }
    // A device still in the root namespace (crash between creating and moving it).
    for line in ip(&["-o", "link", "show"])?.lines() {
        let Some(name) = line
            .split(": ")
            .nth(1)
            .map(|n| n.split('@').next().unwrap_or(n))
        else {
            continue;
        };
        if pid_of(name).is_some_and(|pid| !owner_alive(pid)) {
            match ip(&["link", "del", name]) {
                Ok(_) => removed.push(name.to_owned()),
                Err(e) => eprintln!("impair: stale {name}: {e:#}"),
            }
        }
    }
    Ok(removed)
}

/// Both namespaces with a TUN device each, up and addressed. Dropping it closes the devices
/// (which destroys them) and deletes the namespaces.
pub struct Topology {
    /// Names and addresses.
    pub names: Names,
    /// TUN device of side A (in namespace A).
    pub tun_a: Option<tun_rs::SyncDevice>,
    /// TUN device of side B (in namespace B).
    pub tun_b: Option<tun_rs::SyncDevice>,
    created_ns: Vec<String>,
}

impl std::fmt::Debug for Topology {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Topology")
            .field("names", &self.names)
            .field("created_ns", &self.created_ns)
            .finish_non_exhaustive()
    }
}

impl Topology {
    /// Creates the namespaces and devices for `names`.
    pub fn create(names: Names) -> anyhow::Result<Topology> {
        let mut topo = Topology {
            names,
            tun_a: None,
            tun_b: None,
            created_ns: Vec::new(),
        };
        let Names {
            ns_a,
            ns_b,
            addr_a,
            addr_b,
        } = topo.names.clone();
        for ns in [&ns_a, &ns_b] {
            ip(&["netns", "add", ns])?;
            topo.created_ns.push(ns.clone());
        }
        topo.tun_a = Some(tun_device(&ns_a)?);
        topo.tun_b = Some(tun_device(&ns_b)?);
        for (ns, addr) in [(&ns_a, addr_a), (&ns_b, addr_b)] {
            ip(&["link", "set", ns, "netns", ns])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
            ip(&["-n", ns, "addr", "add", &format!("{addr}/30"), "dev", ns])?;
            ip(&["-n", ns, "link", "set", ns, "up"])?;
        }
        Ok(topo)
    }
}

fn tun_device(name: &str) -> anyhow::Result<tun_rs::SyncDevice> {
    let dev = tun_rs::DeviceBuilder::new()
        .name(name)
        .mtu(MTU)
        .tx_queue_len(TX_QUEUE_LEN)
        .packet_information(false)
        .build_sync()
        .with_context(|| format!("creating TUN device {name}"))?;
    dev.set_nonblocking(true)
        .with_context(|| format!("making TUN device {name} non-blocking"))?;
    Ok(dev)
}

impl Drop for Topology {
    fn drop(&mut self) {
        // Closing a (non-persistent) TUN device's descriptor destroys the device.
        self.tun_a.take();
        self.tun_b.take();
        for ns in self.created_ns.drain(..) {
            if let Err(e) = ip(&["netns", "del", &ns]) {
                eprintln!("impair: cleanup: {e:#}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_per_pid_and_parse_back() {
        let n = Names::for_pid(4_194_303);
        assert_eq!(n.ns_a, "blk4194303a");
        assert!(n.ns_a.len() <= 15, "interface names are at most 15 bytes");
        assert_eq!(n.addr_a, Ipv4Addr::new(10, 255, 255, 253));
        assert_eq!(n.addr_b, Ipv4Addr::new(10, 255, 255, 254));
        assert_eq!(Names::for_pid(1).addr_a, Ipv4Addr::new(10, 0, 0, 5));
        assert_eq!(pid_of("blk123a"), Some(123));
        assert_eq!(pid_of("blk123b"), Some(123));
        for bad in ["blk123", "blka", "blk12x3a", "xblk1a", "blk1c"] {
            assert_eq!(pid_of(bad), None, "{bad}");
        }
    }
}
