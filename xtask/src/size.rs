//! Byte sizes on the command line: `1073741824`, `1GiB`, `512MiB`, `10GB`, `64k`.

/// Parses a byte count with an optional unit.
///
/// Units are case-insensitive: `B`; `K`, `KiB`, `M`, `MiB`, `G`, `GiB`, `T`, `TiB` are powers of
/// 1024 (as in coreutils' `1G`); `kB`, `MB`, `GB`, `TB` are powers of 1000. Underscores may group
/// digits (`1_000_000`); a space may separate the number from the unit.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '_'))
        .unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    let digits: String = digits.chars().filter(|&c| c != '_').collect();
    if digits.is_empty() {
        return Err(format!(
            "`{text}` is not a size (expected e.g. 1073741824, 1GiB, 512MiB)"
        ));
    }
    let number: u64 = digits
        .parse()
        .map_err(|_| format!("`{text}`: number too large"))?;
    let multiplier: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" => 1 << 10,
        "m" | "mib" => 1 << 20,
        "g" | "gib" => 1 << 30,
        "t" | "tib" => 1 << 40,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        other => {
            return Err(format!(
                "`{text}`: unknown unit `{other}` (use B, KiB, MiB, GiB, TiB, kB, MB, GB or TB)"
            ));
        }
    };
    number
        .checked_mul(multiplier)
        .ok_or_else(|| format!("`{text}` does not fit in 64 bits"))
}

/// Formats a byte count for people: `1.00 GiB`, `512.0 MiB`, `17 B`.
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else if value < 10.0 {
        format!("{value:.2} {}", UNITS[unit])
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_numbers_are_bytes() {
        assert_eq!(parse_size("0"), Ok(0));
        assert_eq!(parse_size("1073741824"), Ok(1 << 30));
        assert_eq!(parse_size(" 42 "), Ok(42));
        assert_eq!(parse_size("42B"), Ok(42));
        assert_eq!(parse_size("1_000_000"), Ok(1_000_000));
    }

    #[test]
    fn binary_units() {
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("512MiB"), Ok(512 << 20));
        assert_eq!(parse_size("64k"), Ok(64 << 10));
        assert_eq!(parse_size("64KiB"), Ok(64 << 10));
        assert_eq!(parse_size("2G"), Ok(2 << 30));
        assert_eq!(parse_size("1tib"), Ok(1 << 40));
        assert_eq!(parse_size("4 MiB"), Ok(4 << 20));
    }

    #[test]
    fn decimal_units() {
        assert_eq!(parse_size("10GB"), Ok(10_000_000_000));
        assert_eq!(parse_size("1kB"), Ok(1000));
        assert_eq!(parse_size("3mb"), Ok(3_000_000));
        assert_eq!(parse_size("1TB"), Ok(1_000_000_000_000));
    }

    #[test]
    fn refusals_say_why() {
        assert!(parse_size("").unwrap_err().contains("not a size"));
        assert!(parse_size("GiB").unwrap_err().contains("not a size"));
        assert!(parse_size("-1").unwrap_err().contains("not a size"));
        assert!(parse_size("1.5GiB").unwrap_err().contains("unknown unit"));
        assert!(
            parse_size("3 parsecs")
                .unwrap_err()
                .contains("unknown unit `parsecs`")
        );
        assert!(
            parse_size("99999999999999999999")
                .unwrap_err()
                .contains("too large")
        );
        assert!(parse_size("16777216TiB").unwrap_err().contains("64 bits"));
    }

    #[test]
    fn human_readable() {
        assert_eq!(human(17), "17 B");
        assert_eq!(human(1 << 30), "1.00 GiB");
        assert_eq!(human(512 << 20), "512.0 MiB");
        assert_eq!(human(1536), "1.50 KiB");
    }
}
