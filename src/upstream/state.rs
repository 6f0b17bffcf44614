//! The states an endpoint's checks can be in, and the names of the checks: one enum
//! each, with the one name (`as_str`, also their JSON form) that `/status`, the metrics,
//! the status page and the logs use.

use serde::Serialize;

/// What the active health check (`GET /health`) last decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum HealthState {
    /// Before the first check.
    #[default]
    Unknown,
    Healthy,
    Unhealthy,
}

impl HealthState {
    pub const ALL: [HealthState; 3] = [Self::Unknown, Self::Healthy, Self::Unhealthy];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Unknown => "unknown",
            Self::Healthy => "healthy",
            Self::Unhealthy => "unhealthy",
        }
    }
}

/// What the data-path check (TCP + TLS to the inference address), or a real request's
/// connect failure, last decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DataPathState {
    /// Before the first check.
    #[default]
    Unknown,
    Ok,
    Failed,
}

impl DataPathState {
    pub const ALL: [DataPathState; 3] = [Self::Unknown, Self::Ok, Self::Failed];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Unknown => "unknown",
            Self::Ok => "ok",
            Self::Failed => "failed",
        }
    }
}

/// What took an endpoint's data path out last: `/status`'s `data_path.failed_by`, the
/// log's `failed_by`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FailedBy {
    /// The health round's data-path check (its TCP connect and TLS handshake).
    Check,
    /// A real request's connect or TLS failure.
    Request,
}

impl FailedBy {
    pub const ALL: [FailedBy; 2] = [Self::Check, Self::Request];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Check => "check",
            Self::Request => "request",
        }
    }
}

/// The two checks that keep an endpoint out of service: the `check` label of
/// `gpulink_endpoint_check_failing`, `/status`'s `failing_checks`, the log's `check`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Check {
    Health,
    DataPath,
}

impl Check {
    /// Every check, for the test that each serializes as its name.
    #[cfg(test)]
    pub const ALL: [Check; 2] = [Self::Health, Self::DataPath];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Health => "health",
            Self::DataPath => "data_path",
        }
    }
}

macro_rules! compares_with_its_name {
    ($($t:ty),*) => {$(
        impl PartialEq<&str> for $t {
            fn eq(&self, other: &&str) -> bool {
                self.as_str() == *other
            }
        }
    )*};
}
compares_with_its_name!(HealthState, DataPathState, FailedBy, Check);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_json_form_is_the_name() {
        for state in HealthState::ALL {
            assert_eq!(serde_json::json!(state), state.as_str());
        }
        for state in DataPathState::ALL {
            assert_eq!(serde_json::json!(state), state.as_str());
        }
        for by in FailedBy::ALL {
            assert_eq!(serde_json::json!(by), by.as_str());
        }
        for check in Check::ALL {
            assert_eq!(serde_json::json!(check), check.as_str());
        }
    }
}
