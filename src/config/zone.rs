//! An availability zone as gpulink compares it: the proxy's own (`[placement] zone`, or
//! what the instance metadata service says) and each PrivateLink endpoint's (`zone` in
//! an endpoint table, or what EC2 discovery says). Zone-aware routing only ever asks
//! whether two zones are the same string, so the one thing this type guarantees is that
//! every zone it holds is a short, printable token: safe in `/status`, logs and the
//! status page whatever a metadata service or an API answered.
//!
//! A zone may be written as an id (`use1-az1`) or a name (`us-east-1a`). They are not
//! translated: `use1-az1` and `us-east-1a` are different zones to gpulink. Ids are the
//! better choice, because an id names the same physical zone in every AWS account while
//! names are shuffled per account.

use serde::Serialize;

/// The longest zone accepted. AWS zone ids and names are under 30 characters (Local
/// and Wavelength Zones included: `us-east-1-wl1-bos-wlz-1`); 64 leaves room without
/// letting a configuration or an answer put a paragraph into every `/status` entry.
pub const MAX_ZONE_LEN: usize = 64;

/// A checked availability zone id or name, compared by exact string equality.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct Zone(String);

impl Zone {
    /// `value` as a zone: 1 to [`MAX_ZONE_LEN`] ASCII letters, digits and `-`. The error
    /// says what is wrong, for a configuration message or a log line (it does not repeat
    /// the value, which may be whatever a remote service answered).
    pub fn new(value: &str) -> Result<Zone, String> {
        if value.is_empty() {
            return Err(
                "must not be empty (an availability zone id such as `use1-az1`, or a name \
                 such as `us-east-1a`)"
                    .into(),
            );
        }
        if value.len() > MAX_ZONE_LEN {
            return Err(format!(
                "is {} characters long: an availability zone is at most {MAX_ZONE_LEN}",
                value.len()
            ));
        }
        if !value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        {
            return Err(
                "may hold only ASCII letters, digits and `-` (an availability zone id such \
                 as `use1-az1`, or a name such as `us-east-1a`)"
                    .into(),
            );
        }
        Ok(Zone(value.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for Zone {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_and_names_are_zones_compared_exactly() {
        for ok in [
            "use1-az1",
            "us-east-1a",
            "us-east-1-wl1-bos-wlz-1",
            "USE1-AZ1",
        ] {
            assert_eq!(Zone::new(ok).expect(ok).as_str(), ok);
        }
        // No translation between ids and names, and no case folding.
        assert_ne!(Zone::new("use1-az1"), Zone::new("us-east-1a"));
        assert_ne!(Zone::new("use1-az1"), Zone::new("USE1-AZ1"));
    }

    #[test]
    fn junk_is_refused_without_echoing_it() {
        let long = "a".repeat(MAX_ZONE_LEN + 1);
        for bad in [
            "",
            " use1-az1",
            "use1 az1",
            "use1-az1\n",
            "<b>",
            "zone\u{e9}",
            &long,
        ] {
            let err = Zone::new(bad).expect_err(bad);
            assert!(bad.is_empty() || !err.contains(bad), "{err}");
        }
        assert!(Zone::new(&"a".repeat(MAX_ZONE_LEN)).is_ok());
    }
}
