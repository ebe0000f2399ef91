//! Debian packages the tests and the demo need: check with `dpkg-query`, install with `apt-get`.

use std::io::ErrorKind;
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

use crate::cmd;

/// One Debian package and what baylink needs it for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Package {
    /// The Debian package name.
    pub name: &'static str,
    /// Why the project needs it (shown when it is missing).
    pub why: &'static str,
}

/// Everything the test suite needs from Debian, one entry per package.
pub const TEST_PACKAGES: &[Package] = &[
    // PKCS#11 software token: every signing test and `dev-env` (libsofthsm2.so, softhsm2-util).
    SOFTHSM2,
    Package {
        name: "opensc",
        // pkcs11-tool: tests inspect tokens independently of our own PKCS#11 code.
        why: "pkcs11-tool, to inspect tokens independently of baylink",
    },
    Package {
        name: "dcmtk",
        // storescu/echoscu/dcmodify: a real DICOM client against the edge's C-STORE SCP.
        why: "storescu, echoscu and dcmodify for the C-STORE tests; dump2dcm for STOW-RS tests",
    },
    Package {
        name: "openssh-server",
        // sshd: the scp baseline in the benchmark harness and its smoke test.
        why: "sshd for the scp baseline of baylink-bench",
    },
    Package {
        name: "openssh-client",
        // scp/ssh-keygen: the client side of the scp baseline.
        why: "scp and ssh-keygen for the scp baseline of baylink-bench",
    },
    Package {
        name: "iperf3",
        // Raw TCP/UDP throughput through the impairment forwarder, to calibrate the link.
        why: "iperf3 to calibrate the impaired link",
    },
    Package {
        name: "iproute2",
        // `ip netns`/`ip link`: the impairment forwarder's namespaces and TUN devices.
        why: "ip (netns, link) for the emulated links of baylink-bench impair",
    },
    Package {
        name: "iputils-ping",
        // ping: the delay accuracy check of the impairment forwarder.
        why: "ping to check the emulated link's round-trip time",
    },
    Package {
        name: "curl",
        // The HTTPS client (client certificates) of the hospital API tests and baylink-bench ingest.
        why: "curl with client certificates for the hospital API tests and baylink-bench ingest",
    },
    Package {
        name: "openssl",
        // `openssl s_client`: the slowloris test holds a TLS connection with half a header.
        why: "openssl s_client for the hospital API's header-timeout test",
    },
    Package {
        name: "orthanc",
        // The downstream health-record store the gateway delivers into (STOW-RS).
        why: "Orthanc, the health-record store of the DICOMweb delivery tests",
    },
    Package {
        name: "orthanc-dicomweb",
        // Orthanc's DICOMweb plugin: the STOW-RS endpoint itself.
        why: "Orthanc's DICOMweb plugin (STOW-RS) for the delivery tests",
    },
    Package {
        name: "xfsprogs",
        // mkfs.xfs: a file system with reflinks, where the seal clones instead of copying.
        why: "mkfs.xfs, for the test of sealing by copy-on-write clone",
    },
    Package {
        name: "stunnel4",
        // A TLS front for Orthanc (whose own HTTPS crashes in Debian's 1.10 build).
        why: "stunnel, the https front of the store in the https delivery tests",
    },
    Package {
        name: "systemd",
        // systemd-analyze: `verify` and `security` of the shipped unit in CI (no running systemd
        // is needed: both read the unit file offline).
        why: "systemd-analyze, to verify the shipped unit and rate its sandboxing",
    },
    Package {
        name: "python3-pydicom",
        // /usr/bin/python3 with pydicom: plants identifiers in the real-file corpus and checks
        // the de-identified output with a DICOM reader independent of baylink.
        why: "pydicom, to plant identifiers and check de-identified files independently",
    },
    Package {
        name: "python3-pip",
        // pip for /usr/bin/python3: installs the PyPI packages of TEST_PYTHON_PACKAGES.
        why: "pip, to install pynetdicom for the Storage Commitment tests",
    },
    Package {
        name: "prometheus",
        // promtool checks the shipped alert rules; a real server scrapes an edge and a gateway.
        why: "promtool for the shipped alert rules, and a Prometheus that scrapes the appliances",
    },
];

/// A PyPI package the tests need in Debian's `/usr/bin/python3`, pinned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PythonPackage {
    /// The PyPI name, also its import name.
    pub name: &'static str,
    /// The exact version installed.
    pub version: &'static str,
    /// Why the project needs it.
    pub why: &'static str,
}

/// PyPI packages of the tests. Installed without dependencies: they use Debian's pydicom.
pub const TEST_PYTHON_PACKAGES: &[PythonPackage] = &[PythonPackage {
    name: "pynetdicom",
    // 2.0.x is the last line that works with Debian 12's pydicom 2.3.
    version: "2.0.2",
    why: "the modality side (N-ACTION SCU, N-EVENT-REPORT listener) of the Storage Commitment tests",
}];

/// Makes sure every package of `wanted` is importable from `/usr/bin/python3` at its pinned
/// version; installs the missing ones with pip (as root, when `may_install`).
pub fn ensure_python(wanted: &[PythonPackage], may_install: bool) -> Result<()> {
    let python = "/usr/bin/python3";
    let installed = |p: &PythonPackage| {
        Command::new(python)
            .args([
                "-c",
                &format!(
                    "import {0}, sys; sys.exit({0}.__version__ != '{1}')",
                    p.name, p.version
                ),
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    let absent: Vec<&PythonPackage> = wanted.iter().filter(|p| !installed(p)).collect();
    if absent.is_empty() {
        println!("python packages: all {} installed", wanted.len());
        return Ok(());
    }
    let specs: Vec<String> = absent
        .iter()
        .map(|p| format!("{}=={}", p.name, p.version))
        .collect();
    if !may_install || !nix::unistd::geteuid().is_root() {
        bail!(
            "missing for {python}: {} ({}); install with: sudo {python} -m pip install \
             --break-system-packages --no-deps {}",
            specs.join(" "),
            absent.iter().map(|p| p.why).collect::<Vec<_>>().join("; "),
            specs.join(" ")
        );
    }
    println!("python packages: installing {}", specs.join(" "));
    cmd::run(
        Command::new(python)
            .args([
                "-m",
                "pip",
                "install",
                "--break-system-packages",
                "--no-deps",
            ])
            .args(&specs),
    )
    .context("pip install failed")?;
    if let Some(p) = wanted.iter().find(|p| !installed(p)) {
        bail!(
            "pip reported success but {}=={} is still not importable",
            p.name,
            p.version
        );
    }
    Ok(())
}

/// The software HSM that `baylink dev-env` provisions.
pub const SOFTHSM2: Package = Package {
    name: "softhsm2",
    why: "the PKCS#11 software token that dev-env provisions and every signing test uses",
};

/// What `cargo xtask demo` needs: the HSM, the hospital's DICOM client, the record store and
/// the tools that check the evidence independently of baylink.
pub const DEMO: &[Package] = &[
    SOFTHSM2,
    Package {
        name: "dcmtk",
        why: "storescu, the hospital PACS that sends the demo's CT study by C-STORE",
    },
    Package {
        name: "orthanc",
        why: "Orthanc, the record store the demo's gateway delivers into",
    },
    Package {
        name: "orthanc-dicomweb",
        why: "Orthanc's DICOMweb plugin: the STOW-RS endpoint the gateway delivers to",
    },
    Package {
        name: "openssl",
        why: "openssl dgst, to check the gateway's signed receipt outside baylink",
    },
    Package {
        name: "curl",
        why: "curl, the hospital API client (client certificate) and Orthanc's REST API",
    },
    Package {
        name: "python3-pip",
        why: "pip, to install pynetdicom: the modality that asks for Storage Commitment",
    },
    Package {
        name: "python3-pydicom",
        why: "pydicom, which pynetdicom (the demo's Storage Commitment SCU) builds on",
    },
];

/// What to do about the packages that are missing.
#[derive(Debug, PartialEq, Eq)]
enum Plan<'a> {
    /// Everything is installed.
    Nothing,
    /// Install these (we are root and may install).
    Install(Vec<&'a Package>),
    /// These are missing and we may not or cannot install them.
    Refuse {
        missing: Vec<&'a Package>,
        reason: Refusal,
    },
}

#[derive(Debug, PartialEq, Eq, Clone, Copy)]
enum Refusal {
    NotRoot,
    InstallDisabled,
}

/// True when a dpkg `${Status}` (`want flag status`, e.g. `install ok installed`) means the
/// package's files are on disk.
pub fn is_installed(status: &str) -> bool {
    status.split_whitespace().nth(2) == Some("installed")
}

/// Asks dpkg for one package's status; `None` when dpkg does not know the package at all.
fn dpkg_status(name: &str) -> Result<Option<String>> {
    let out = Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", name])
        .stdin(Stdio::null())
        .output();
    let out = match out {
        Ok(out) => out,
        Err(e) if e.kind() == ErrorKind::NotFound => bail!(
            "dpkg-query not found: this needs a Debian-based system (or install the packages \
             by hand and pass --skip-install)"
        ),
        Err(e) => return Err(e).context("cannot run dpkg-query"),
    };
    if out.status.success() {
        Ok(Some(String::from_utf8_lossy(&out.stdout).into_owned()))
    } else {
        // dpkg-query exits 1 with "no packages found matching NAME".
        Ok(None)
    }
}

/// The packages of `wanted` that `status` does not report as installed.
fn missing(
    wanted: &[Package],
    mut status: impl FnMut(&str) -> Result<Option<String>>,
) -> Result<Vec<&Package>> {
    let mut out = Vec::new();
    for p in wanted {
        let installed = status(p.name)?.is_some_and(|s| is_installed(&s));
        if !installed {
            out.push(p);
        }
    }
    Ok(out)
}

fn plan(missing: Vec<&Package>, is_root: bool, may_install: bool) -> Plan<'_> {
    if missing.is_empty() {
        Plan::Nothing
    } else if !may_install {
        Plan::Refuse {
            missing,
            reason: Refusal::InstallDisabled,
        }
    } else if !is_root {
        Plan::Refuse {
            missing,
            reason: Refusal::NotRoot,
        }
    } else {
        Plan::Install(missing)
    }
}

fn names(packages: &[&Package]) -> String {
    packages
        .iter()
        .map(|p| p.name)
        .collect::<Vec<_>>()
        .join(" ")
}

/// The command a person should run to install `packages`.
fn install_hint(packages: &[&Package]) -> String {
    format!(
        "sudo apt-get update && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y \
         --no-install-recommends {}",
        names(packages)
    )
}

fn refusal_message(missing: &[&Package], reason: Refusal) -> String {
    let mut msg = format!("missing Debian packages: {}\n", names(missing));
    for p in missing {
        msg.push_str(&format!("  {:<16} {}\n", p.name, p.why));
    }
    match reason {
        Refusal::NotRoot => msg.push_str("not root, so not installing them; run:\n  "),
        Refusal::InstallDisabled => msg.push_str("installing was disabled; to install, run:\n  "),
    }
    msg.push_str(&install_hint(missing));
    msg
}

/// Makes sure every package of `wanted` is installed.
///
/// Missing ones are installed with `apt-get update` then `apt-get install` when running as root
/// and `may_install` is true; otherwise the error names the packages and the command to run.
pub fn ensure(wanted: &[Package], may_install: bool) -> Result<()> {
    let absent = missing(wanted, dpkg_status)?;
    let is_root = nix::unistd::geteuid().is_root();
    match plan(absent, is_root, may_install) {
        Plan::Nothing => {
            println!("packages: all {} installed", wanted.len());
            Ok(())
        }
        Plan::Refuse { missing, reason } => bail!("{}", refusal_message(&missing, reason)),
        Plan::Install(absent) => {
            println!("packages: installing {}", names(&absent));
            cmd::run(Command::new("apt-get").args(["-o", "DPkg::Lock::Timeout=300", "update"]))
                .context("apt-get update failed")?;
            let mut install = Command::new("apt-get");
            install
                .env("DEBIAN_FRONTEND", "noninteractive")
                .args([
                    "-o",
                    "DPkg::Lock::Timeout=300",
                    "-o",
                    "Dpkg::Options::=--force-confdef",
                    "-o",
                    "Dpkg::Options::=--force-confold",
                    "install",
                    "-y",
                    "--no-install-recommends",
                ])
                .args(absent.iter().map(|p| p.name));
            cmd::run(&mut install)
                .with_context(|| format!("installing {} failed", names(&absent)))?;
            let still = missing(wanted, dpkg_status)?;
            if !still.is_empty() {
                bail!(
                    "apt-get reported success but these are still not installed: {}",
                    names(&still)
                );
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dpkg_status_words() {
        assert!(is_installed("install ok installed"));
        assert!(is_installed("hold ok installed"));
        assert!(is_installed("deinstall ok installed"));
        assert!(!is_installed("deinstall ok config-files"));
        assert!(!is_installed("install ok half-installed"));
        assert!(!is_installed("unknown ok not-installed"));
        assert!(!is_installed(""));
    }

    #[test]
    fn missing_counts_unknown_and_removed_packages() {
        let found = missing(TEST_PACKAGES, |name| {
            Ok(match name {
                "dcmtk" => None,
                "iperf3" => Some("deinstall ok config-files".to_owned()),
                _ => Some("install ok installed".to_owned()),
            })
        })
        .unwrap();
        let names: Vec<_> = found.iter().map(|p| p.name).collect();
        assert_eq!(names, ["dcmtk", "iperf3"]);
    }

    #[test]
    fn query_errors_propagate() {
        let e = missing(TEST_PACKAGES, |_| bail!("dpkg-query not found")).unwrap_err();
        assert!(e.to_string().contains("dpkg-query"));
    }

    #[test]
    fn plans() {
        let p = &TEST_PACKAGES[0];
        assert_eq!(plan(vec![], false, true), Plan::Nothing);
        assert_eq!(plan(vec![], true, false), Plan::Nothing);
        assert_eq!(plan(vec![p], true, true), Plan::Install(vec![p]));
        assert_eq!(
            plan(vec![p], false, true),
            Plan::Refuse {
                missing: vec![p],
                reason: Refusal::NotRoot
            }
        );
        assert_eq!(
            plan(vec![p], true, false),
            Plan::Refuse {
                missing: vec![p],
                reason: Refusal::InstallDisabled
            }
        );
    }

    #[test]
    fn refusal_names_packages_and_the_command() {
        let missing: Vec<_> = TEST_PACKAGES
            .iter()
            .filter(|p| p.name != "opensc")
            .collect();
        let msg = refusal_message(&missing, Refusal::NotRoot);
        assert!(msg.contains("not root"), "{msg}");
        assert!(msg.contains(
            "apt-get install -y --no-install-recommends softhsm2 dcmtk openssh-server \
             openssh-client iperf3"
        ));
        assert!(!msg.contains("opensc"), "{msg}");
    }

    #[test]
    fn the_list_has_no_duplicates_and_every_entry_says_why() {
        let mut names: Vec<_> = TEST_PACKAGES.iter().map(|p| p.name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), TEST_PACKAGES.len());
        assert!(TEST_PACKAGES.iter().all(|p| !p.why.is_empty()));
        assert!(TEST_PACKAGES.contains(&SOFTHSM2));
        // The demo needs nothing CI does not install.
        assert!(
            DEMO.iter()
                .all(|d| TEST_PACKAGES.iter().any(|t| t.name == d.name))
        );
    }

    #[test]
    fn a_real_query_answers_for_an_unknown_package() {
        // Only meaningful on Debian; elsewhere dpkg-query is absent and that error is fine too.
        match dpkg_status("baylink-no-such-package") {
            Ok(status) => assert_eq!(status, None),
            Err(e) => assert!(e.to_string().contains("dpkg-query"), "{e}"),
        }
    }
}
