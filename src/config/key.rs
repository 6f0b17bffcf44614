//! The KMS key as configured: `kms.key_id` is an ARN, a bare key id or an alias, and the
//! envelope formats need the ARN (it is written into every AWS Encryption SDK message).
//! Parsed once when the configuration is compiled, so nothing downstream re-checks it.

use std::fmt;

/// `kms.key_id` as written, with its ARN when it is one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyId {
    text: String,
    arn: Option<KeyArn>,
}

impl KeyId {
    pub fn new(text: &str) -> Self {
        Self {
            text: text.to_string(),
            arn: KeyArn::parse(text).ok(),
        }
    }

    /// As written in the file, which is what KMS is sent.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The ARN, when `kms.key_id` is one.
    pub fn arn(&self) -> Option<&KeyArn> {
        self.arn.as_ref()
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl PartialEq<str> for KeyId {
    fn eq(&self, other: &str) -> bool {
        self.text == other
    }
}

impl PartialEq<&str> for KeyId {
    fn eq(&self, other: &&str) -> bool {
        self.text == *other
    }
}

/// A KMS key ARN, `arn:PARTITION:kms:REGION:ACCOUNT:key/ID`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyArn {
    partition: String,
    region: String,
    account: String,
    id: String,
}

impl KeyArn {
    /// Parses a key ARN; aliases (`alias/...`, also as an ARN) and bare key ids are not.
    pub fn parse(text: &str) -> Result<Self, String> {
        let not_arn = || {
            format!(
                "`{text}` is not a KMS key ARN (arn:aws:kms:REGION:ACCOUNT:key/KEY-ID; \
                 aliases and bare key ids are refused)"
            )
        };
        let parts: Vec<&str> = text.splitn(6, ':').collect();
        let [arn, partition, service, region, account, resource] = parts[..] else {
            return Err(not_arn());
        };
        let Some(id) = resource.strip_prefix("key/") else {
            return Err(not_arn());
        };
        let id_ok = !id.is_empty()
            && id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
        if arn != "arn"
            || !partition.starts_with("aws")
            || service != "kms"
            || region.is_empty()
            || account.len() != 12
            || !account.chars().all(|c| c.is_ascii_digit())
            || !id_ok
        {
            return Err(not_arn());
        }
        Ok(Self {
            partition: partition.to_string(),
            region: region.to_string(),
            account: account.to_string(),
            id: id.to_string(),
        })
    }

    pub fn partition(&self) -> &str {
        &self.partition
    }

    /// The region KMS serves the key in (only there).
    pub fn region(&self) -> &str {
        &self.region
    }

    pub fn account(&self) -> &str {
        &self.account
    }

    /// The key id (a UUID, or `mrk-...` for a multi-Region key).
    pub fn id(&self) -> &str {
        &self.id
    }
}

/// Checks that `key_id` is a KMS key ARN in `region` (KMS only serves a key in its own
/// region).
pub fn check_key_arn(key_id: &str, region: &str) -> Result<KeyArn, String> {
    let arn = KeyArn::parse(key_id)?;
    if arn.region() != region {
        return Err(format!(
            "the key `{key_id}` is in region `{}` but kms.region is `{region}`; \
             KMS serves a key only in its own region",
            arn.region()
        ));
    }
    Ok(arn)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_arn_is_typed_and_an_alias_is_not() {
        let key = KeyId::new("arn:aws:kms:us-east-1:111122223333:key/1234abcd-12ab");
        let arn = key.arn().expect("an ARN");
        assert_eq!(
            (arn.partition(), arn.region(), arn.account(), arn.id()),
            ("aws", "us-east-1", "111122223333", "1234abcd-12ab")
        );
        assert_eq!(key.to_string(), key.as_str());
        assert!(KeyId::new("alias/gpulink").arn().is_none());
        assert!(
            KeyId::new("arn:aws:kms:us-east-1:111122223333:alias/gpulink")
                .arn()
                .is_none()
        );
    }
}
