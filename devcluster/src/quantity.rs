//! Kubernetes resource quantities (`500m`, `1.5Gi`, `2e3`, `64Mi`) as whole milli-units, the way
//! quota arithmetic needs them: parsed as apimachinery's `resource.Quantity` reads them (a
//! fraction of a milli-unit rounds up), and printed in its canonical form.

/// The grammar upstream states in its validation message.
pub const QUANTITY_PATTERN: &str = r"^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$";

/// The binary suffixes, smallest first (each 1024 times the last).
const BINARY: [&str; 6] = ["Ki", "Mi", "Gi", "Ti", "Pi", "Ei"];
/// The decimal suffixes above one, smallest first (each 1000 times the last).
const DECIMAL: [&str; 6] = ["k", "M", "G", "T", "P", "E"];

/// Parses a quantity into milli-units; negative quantities are refused (no resource request or
/// quota is negative). The error says why, for a field's validation message.
pub fn parse_millis(text: &str) -> Result<i128, String> {
    let invalid = || format!("quantities must match the regular expression '{QUANTITY_PATTERN}'");
    let text = text.strip_prefix('+').unwrap_or(text);
    if text.starts_with('-') {
        return Err("must be greater than or equal to 0".into());
    }
    let number_end = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, suffix) = text.split_at(number_end);
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    if whole.is_empty() && fraction.is_empty() || fraction.contains('.') {
        return Err(invalid());
    }
    let digits = format!("{whole}{fraction}");
    let digits = digits.trim_start_matches('0');
    if digits.len() > 30 {
        return Err("is too large".into());
    }
    let mantissa: i128 = if digits.is_empty() {
        0
    } else {
        digits.parse().map_err(|_| invalid())?
    };
    // value = mantissa × 10^(exponent) × 1024^(binary); millis = value × 1000.
    let (mut exponent, binary): (i32, u32) = match suffix {
        "" => (0, 0),
        "n" => (-9, 0),
        "u" => (-6, 0),
        "m" => (-3, 0),
        s if BINARY.contains(&s) => (0, BINARY.iter().position(|b| *b == s).unwrap_or(0) as u32 + 1),
        s if DECIMAL.contains(&s) => (
            3 * (DECIMAL.iter().position(|d| *d == s).unwrap_or(0) as i32 + 1),
            0,
        ),
        s => match s.strip_prefix(['e', 'E']) {
            Some(power) if !power.is_empty() => (power.parse::<i32>().map_err(|_| invalid())?, 0),
            _ => return Err(invalid()),
        },
    };
    exponent += 3 - fraction.len() as i32;
    if mantissa == 0 {
        return Ok(0);
    }
    let too_large = || "is too large".to_string();
    let scaled = 1024_i128
        .checked_pow(binary)
        .and_then(|b| mantissa.checked_mul(b))
        .ok_or_else(too_large)?;
    if exponent >= 0 {
        10_i128
            .checked_pow(exponent as u32)
            .and_then(|p| scaled.checked_mul(p))
            .ok_or_else(too_large)
    } else {
        // Below a milli-unit: round up, as `MilliValue` does.
        match 10_i128.checked_pow(exponent.unsigned_abs()) {
            Some(p) => Ok((scaled + p - 1) / p),
            None => Ok(1),
        }
    }
}

/// Prints milli-units canonically: `500m`, `2`, `2k`, `64Mi` (a binary suffix when `binary` and
/// the value is a whole number of one; the largest suffix that keeps the number whole).
pub fn format_millis(millis: i128, binary: bool) -> String {
    if millis % 1000 != 0 {
        return format!("{millis}m");
    }
    let whole = millis / 1000;
    if whole == 0 {
        return "0".into();
    }
    if binary {
        let mut unit = 1_i128;
        let mut best: Option<(i128, &str)> = None;
        for suffix in BINARY {
            unit *= 1024;
            if whole % unit == 0 {
                best = Some((whole / unit, suffix));
            }
        }
        if let Some((n, suffix)) = best {
            return format!("{n}{suffix}");
        }
    }
    let mut unit = 1_i128;
    let mut best = (whole, "");
    for suffix in DECIMAL {
        unit *= 1000;
        if whole % unit == 0 {
            best = (whole / unit, suffix);
        }
    }
    format!("{}{}", best.0, best.1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantities_parse_to_milli_units_in_every_form_kubernetes_accepts() {
        for (text, millis) in [
            ("0", 0),
            ("2", 2000),
            ("+2", 2000),
            ("500m", 500),
            ("0.5", 500),
            (".5", 500),
            ("1.5Gi", 1_610_612_736_000),
            ("64Mi", 67_108_864_000),
            ("1Ki", 1_024_000),
            ("2k", 2_000_000),
            ("1G", 1_000_000_000_000),
            ("1e3", 1_000_000),
            ("1E-3", 1),
            ("100u", 1),
            ("1n", 1),
            ("2500000n", 3),
            ("0.0001", 1),
        ] {
            assert_eq!(parse_millis(text), Ok(millis), "{text}");
        }
        for bad in ["", "m", "1.2.3", "abc", "1Qi", "1e", "1 Gi", "Gi", "1mi"] {
            assert!(
                parse_millis(bad).unwrap_err().contains("regular expression"),
                "{bad}"
            );
        }
        assert_eq!(
            parse_millis("-1").unwrap_err(),
            "must be greater than or equal to 0"
        );
        assert_eq!(parse_millis("1e40").unwrap_err(), "is too large");
    }

    #[test]
    fn quantities_print_canonically() {
        for (millis, binary, text) in [
            (0, false, "0"),
            (500, false, "500m"),
            (1500, false, "1500m"),
            (2000, false, "2"),
            (2_000_000, false, "2k"),
            (67_108_864_000, true, "64Mi"),
            (1_610_612_736_000, true, "1536Mi"),
            (1_000_000_000_000, true, "1G"),
            (1_024_000, false, "1024"),
            (250, true, "250m"),
        ] {
            assert_eq!(format_millis(millis, binary), text, "{millis} {binary}");
        }
    }
}
