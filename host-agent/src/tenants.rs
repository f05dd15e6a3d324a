//! Tenant identities: which bearer token belongs to which tenant.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use rcsync_core::config::{ConfigError, Problem};
use rcsync_core::{TenantName, TenantsFile};

/// The bearer tokens of the tenants that have one, read from their `tokenFile`s.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TenantTokens {
    by_token: HashMap<String, TenantName>,
    with_token: HashSet<TenantName>,
}

impl TenantTokens {
    /// Reads every `tokenFile` of `file` (loaded from `path`) (trimmed of surrounding whitespace). Unreadable or empty files and
    /// tokens shared by two tenants are errors naming the tenant's config path.
    pub fn load(path: &Path, file: &TenantsFile) -> Result<Self, ConfigError> {
        let mut tokens = Self::default();
        let mut problems = Vec::new();
        let mut owner: HashMap<String, usize> = HashMap::new();
        for (i, tenant) in file.tenants.iter().enumerate() {
            let Some(token_path) = &tenant.token_file else {
                continue;
            };
            let at = format!("tenants[{i}].tokenFile");
            let token = match std::fs::read_to_string(token_path) {
                Ok(raw) => raw.trim().to_string(),
                Err(e) => {
                    problems.push(Problem {
                        at,
                        message: format!("cannot read {}: {e}", token_path.display()),
                    });
                    continue;
                }
            };
            if token.is_empty() {
                problems.push(Problem {
                    at,
                    message: format!("{} is empty", token_path.display()),
                });
                continue;
            }
            if let Some(first) = owner.insert(token.clone(), i) {
                problems.push(Problem {
                    at,
                    message: format!("tenants[{first}] has the same token: every tenant needs its own"),
                });
                continue;
            }
            tokens.by_token.insert(token, tenant.name.clone());
            tokens.with_token.insert(tenant.name.clone());
        }
        if problems.is_empty() {
            Ok(tokens)
        } else {
            Err(ConfigError {
                file: path.to_path_buf(),
                problems,
            })
        }
    }

    /// The tenant a token belongs to.
    pub fn tenant_of(&self, token: &str) -> Option<&TenantName> {
        self.by_token.get(token)
    }

    /// Whether a tenant is configured with a token.
    pub fn has_token(&self, tenant: &TenantName) -> bool {
        self.with_token.contains(tenant)
    }
}
