//! Kubernetes name, label key and label value validation, with upstream's rules and messages.

/// Maximum length of a label value and of the name part of a label key.
pub const LABEL_NAME_MAX: usize = 63;
/// Maximum length of a DNS-1123 subdomain (label key prefix, most object names).
pub const DNS1123_SUBDOMAIN_MAX: usize = 253;

fn is_alnum(c: char) -> bool {
    c.is_ascii_alphanumeric()
}

/// Checks a label value: empty, or at most 63 characters of `[A-Za-z0-9_.-]` starting and ending
/// with an alphanumeric character. Returns upstream's message on failure.
pub fn validate_label_value(value: &str) -> Result<(), String> {
    if value.is_empty() {
        return Ok(());
    }
    qualified_name_part(value).map_err(|e| format!("invalid label value {value:?}: {e}"))
}

fn qualified_name_part(name: &str) -> Result<(), String> {
    if name.len() > LABEL_NAME_MAX {
        return Err(format!("must be no more than {LABEL_NAME_MAX} characters"));
    }
    let first = name.chars().next();
    let last = name.chars().last();
    let ok_chars = name.chars().all(|c| is_alnum(c) || matches!(c, '-' | '_' | '.'));
    if !ok_chars || !first.is_some_and(is_alnum) || !last.is_some_and(is_alnum) {
        return Err(
            "must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character"
                .to_string(),
        );
    }
    Ok(())
}

/// Checks a DNS-1123 subdomain: at most 253 characters of lower-case alphanumerics, `-` and `.`,
/// starting and ending with an alphanumeric character.
pub fn validate_dns1123_subdomain(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("must not be empty".into());
    }
    if name.len() > DNS1123_SUBDOMAIN_MAX {
        return Err(format!("must be no more than {DNS1123_SUBDOMAIN_MAX} characters"));
    }
    let lower = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit();
    let ok = name.chars().all(|c| lower(c) || c == '-' || c == '.')
        && name
            .split('.')
            .all(|part| part.chars().next().is_some_and(lower) && part.chars().last().is_some_and(lower));
    if !ok {
        return Err("a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character".into());
    }
    Ok(())
}

/// Checks a DNS-1123 label (namespace names, tenant names): at most 63 characters of lower-case
/// alphanumerics and `-`, starting and ending with an alphanumeric character.
pub fn validate_dns1123_label(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("must not be empty".into());
    }
    if name.len() > LABEL_NAME_MAX {
        return Err(format!("must be no more than {LABEL_NAME_MAX} characters"));
    }
    let lower = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit();
    let ok = name.chars().all(|c| lower(c) || c == '-')
        && name.chars().next().is_some_and(lower)
        && name.chars().last().is_some_and(lower);
    if !ok {
        return Err("a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character".into());
    }
    Ok(())
}

/// Checks a label key: an optional DNS-1123 subdomain prefix and `/`, then a name part of at most 63
/// characters (the same rules as a label value, but not empty).
pub fn validate_label_key(key: &str) -> Result<(), String> {
    let (prefix, name) = match key.split_once('/') {
        Some((prefix, name)) => (Some(prefix), name),
        None => (None, key),
    };
    if let Some(prefix) = prefix {
        validate_dns1123_subdomain(prefix)
            .map_err(|e| format!("invalid label key {key:?}: prefix part {e}"))?;
    }
    if name.is_empty() {
        return Err(format!("invalid label key {key:?}: name part must be non-empty"));
    }
    qualified_name_part(name).map_err(|e| format!("invalid label key {key:?}: name part {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_keys() {
        for ok in [
            "a",
            "kubernetes.io/runtime.class",
            "environment",
            "A_b.c-d",
            "x/y",
        ] {
            assert!(validate_label_key(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "/a",
            "a/",
            "-a",
            "a-",
            "Foo.io/a",
            "a/b/c",
            &"x".repeat(64),
            "a b",
        ] {
            assert!(validate_label_key(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn label_values() {
        for ok in ["", "gvisor", "a.b_c-d", &"v".repeat(63)] {
            assert!(validate_label_value(ok).is_ok(), "{ok}");
        }
        for bad in ["-a", "a-", "a b", &"v".repeat(64), "ä"] {
            assert!(validate_label_value(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn dns_names() {
        assert!(validate_dns1123_label("team-a").is_ok());
        assert!(validate_dns1123_label("Team").is_err());
        assert!(validate_dns1123_label("a.b").is_err());
        assert!(validate_dns1123_subdomain("a.b-c").is_ok());
        assert!(validate_dns1123_subdomain("a..b").is_err());
        assert!(validate_dns1123_subdomain("").is_err());
    }
}
