//! Checking the gateway's signed evidence (receipt, delivery notice) with `openssl`, outside
//! baylink: the JSON download's bytes, its signature turned from PKCS#11's `r ‖ s` into DER,
//! the domain-separation prefix the demo expects (not the one the file claims), and the
//! gateway's public key as its HSM exports it.

use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::{Context, Result, anyhow, bail, ensure};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;

use crate::cmd;

/// What the gateway's HSM signs before a receipt's bytes (`net`'s `RECEIPT_CONTEXT`).
pub const RECEIPT_PREFIX: &str = "baylink/1 receipt\n";
/// What it signs before a delivery notice's bytes.
pub const NOTICE_PREFIX: &str = "baylink/1 delivery notice\n";

/// A signed download (`baylink-receipt/1` with field `receipt`, or
/// `baylink-delivery-notice/1` with field `notice`) checked with `openssl dgst -sha256
/// -verify`; writes `<stem>.msg` and `<stem>.sig.der` into `dir`. Returns openssl's answer.
pub fn verify_with_openssl(
    download: &serde_json::Value,
    field: &str,
    prefix: &str,
    public_key: &Path,
    dir: &Path,
    stem: &str,
) -> Result<String> {
    let text = |key: &str| -> Result<&str> {
        download
            .get(key)
            .and_then(|v| v.as_str())
            .ok_or_else(|| anyhow!("the {stem} download has no string `{key}`"))
    };
    ensure!(
        text("signed_prefix")? == prefix,
        "the {stem} names the prefix {:?}, not {prefix:?}",
        text("signed_prefix")?
    );
    let body = STANDARD
        .decode(text(field)?)
        .with_context(|| format!("{stem}: `{field}` is not base64"))?;
    let sig = STANDARD
        .decode(text("signature")?)
        .with_context(|| format!("{stem}: `signature` is not base64"))?;
    let mut msg = prefix.as_bytes().to_vec();
    msg.extend_from_slice(&body);
    let msg_path = dir.join(format!("{stem}.msg"));
    let sig_path = dir.join(format!("{stem}.sig.der"));
    std::fs::write(&msg_path, &msg)
        .with_context(|| format!("cannot write {}", msg_path.display()))?;
    std::fs::write(&sig_path, p1363_to_der(&sig)?)
        .with_context(|| format!("cannot write {}", sig_path.display()))?;
    let mut openssl = Command::new("openssl");
    openssl
        .args(["dgst", "-sha256", "-verify"])
        .arg(public_key)
        .arg("-signature")
        .arg(&sig_path)
        .arg(&msg_path)
        .stdin(Stdio::null());
    let out = openssl
        .output()
        .with_context(|| format!("cannot run `{}`", cmd::display(&openssl)))?;
    let said = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    if !out.status.success() || said != "Verified OK" {
        bail!(
            "`{}` did not verify the {stem} ({}): {said} {}",
            cmd::display(&openssl),
            cmd::describe(out.status),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(said)
}

/// An ECDSA P-256 signature as PKCS#11 gives it (`r ‖ s`, 32 bytes each, big-endian) as the
/// DER `SEQUENCE { INTEGER r, INTEGER s }` openssl reads.
pub fn p1363_to_der(sig: &[u8]) -> Result<Vec<u8>> {
    ensure!(
        sig.len() == 64,
        "an ECDSA P-256 signature is 64 bytes, not {}",
        sig.len()
    );
    let integer = |half: &[u8]| {
        // Minimal: no leading zero bytes, but one zero byte before a set top bit.
        let start = half.iter().position(|&b| b != 0).unwrap_or(half.len() - 1);
        let digits = &half[start..];
        let mut out = vec![0x02];
        if digits[0] & 0x80 != 0 {
            out.push(digits.len() as u8 + 1);
            out.push(0);
        } else {
            out.push(digits.len() as u8);
        }
        out.extend_from_slice(digits);
        out
    };
    let (r, s) = (integer(&sig[..32]), integer(&sig[32..]));
    let mut der = vec![0x30, (r.len() + s.len()) as u8];
    der.extend(r);
    der.extend(s);
    Ok(der)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn der_of_plain_high_bit_and_short_integers() {
        let mut sig = [0x11u8; 64];
        let der = p1363_to_der(&sig).unwrap();
        assert_eq!(&der[..4], &[0x30, 68, 0x02, 32]);
        assert_eq!(&der[36..38], &[0x02, 32]);

        sig[0] = 0x80;
        let der = p1363_to_der(&sig).unwrap();
        assert_eq!(&der[..5], &[0x30, 69, 0x02, 33, 0x00]);

        sig[32] = 0;
        sig[33] = 0;
        sig[34] = 0x01;
        let der = p1363_to_der(&sig).unwrap();
        assert_eq!(&der[..2], &[0x30, 35 + 32]);
        assert_eq!(&der[37..40], &[0x02, 30, 0x01]);

        assert!(p1363_to_der(&sig[..63]).is_err());
    }
}
