//! Kubernetes resource names as RBAC writes them, and their resolution through discovery.
//!
//! A scope names a resource by its plural, group-qualified when it is not in the core group
//! (`pods`, `pods/log`, `statefulsets.apps`, `certificates.cert-manager.io/status`): the part
//! before the first dot is the plural, the rest the API group. A bare name in `agent.toml`
//! (`statefulsets`) is resolved by the agent through the cluster's discovery documents
//! ([`DiscoveryIndex`]) into that canonical form, which is what the agent reports to the
//! gateway. Without discovery, [`crate::kube_request::KubeScope::compile`] reads a bare name
//! as the built-in resource of that plural (`deployments` is apps) or else core, on both
//! sides alike; a custom resource's bare name then grants nothing until it is resolved.

use std::fmt;

/// A parsed resource name: plural, API group ("" for core, `None` when the name was bare),
/// subresource ("" for none).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResourceName {
    pub resource: String,
    pub group: Option<String>,
    pub subresource: String,
}

/// Why a resource name cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("resource {0:?} is not an RBAC resource name: write its plural, group-qualified when not core (statefulsets.apps, certificates.cert-manager.io), optionally with /subresource")]
    Malformed(String),
    #[error("resource {0:?} is cluster-scoped: endpoints reach namespaced resources only")]
    ClusterScoped(String),
    #[error("resource {name:?} is ambiguous in this cluster (served by groups {groups}): write it group-qualified, e.g. {example}")]
    Ambiguous {
        name: String,
        groups: String,
        example: String,
    },
    #[error("resource {0:?} is not served by this cluster (its discovery documents do not list it): check the name or write it group-qualified")]
    NotServed(String),
}

/// Lower-case alphanumerics and '-', starting and ending alphanumeric, at most 63 bytes.
fn is_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// A DNS subdomain (API groups are): dot-separated labels, at most 253 bytes.
fn is_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(is_label)
}

impl ResourceName {
    /// `plural[.group][/subresource]`. Wildcards and anything else are refused.
    pub fn parse(s: &str) -> Result<ResourceName, NameError> {
        let bad = || NameError::Malformed(s.to_string());
        let (name, sub) = match s.split_once('/') {
            Some((n, sub)) => (n, sub),
            None => (s, ""),
        };
        if (!sub.is_empty() && !is_label(sub)) || s.ends_with('/') {
            return Err(bad());
        }
        let (resource, group) = match name.split_once('.') {
            Some((r, g)) => (r, Some(g)),
            None => (name, None),
        };
        if !is_label(resource) || group.is_some_and(|g| !is_subdomain(g)) {
            return Err(bad());
        }
        Ok(ResourceName {
            resource: resource.to_string(),
            group: group.map(str::to_string),
            subresource: sub.to_string(),
        })
    }

    /// The group a name means without discovery: its own, else the built-in group that
    /// serves a bare built-in name (`deployments` is apps), else core.
    pub fn group_or_builtin(&self) -> &str {
        match &self.group {
            Some(g) => g,
            None => BUILTIN_GROUPS
                .iter()
                .find(|(r, _)| *r == self.resource)
                .map_or("", |(_, g)| g),
        }
    }

    /// Refuses the built-in resources known to be cluster-scoped, which no endpoint reaches
    /// (a namespaced request path cannot name them).
    pub fn check_not_cluster_scoped(&self) -> Result<(), NameError> {
        let g = self.group_or_builtin();
        if CLUSTER_SCOPED
            .iter()
            .any(|(cg, r)| *cg == g && *r == self.resource)
        {
            return Err(NameError::ClusterScoped(self.to_string()));
        }
        Ok(())
    }
}

impl fmt::Display for ResourceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.resource)?;
        if let Some(g) = self.group.as_deref().filter(|g| !g.is_empty()) {
            write!(f, ".{g}")?;
        }
        if !self.subresource.is_empty() {
            write!(f, "/{}", self.subresource)?;
        }
        Ok(())
    }
}

/// Namespaced built-in resources outside the core group, by their bare plural: what
/// discovery answers for them on every cluster, so the gateway and an agent that could not
/// read discovery yet agree with one that could.
const BUILTIN_GROUPS: &[(&str, &str)] = &[
    ("deployments", "apps"),
    ("replicasets", "apps"),
    ("statefulsets", "apps"),
    ("daemonsets", "apps"),
    ("controllerrevisions", "apps"),
    ("jobs", "batch"),
    ("cronjobs", "batch"),
    ("ingresses", "networking.k8s.io"),
    ("networkpolicies", "networking.k8s.io"),
    ("roles", "rbac.authorization.k8s.io"),
    ("rolebindings", "rbac.authorization.k8s.io"),
    ("poddisruptionbudgets", "policy"),
    ("horizontalpodautoscalers", "autoscaling"),
    ("leases", "coordination.k8s.io"),
    ("endpointslices", "discovery.k8s.io"),
];

/// Built-in cluster-scoped resources, refused without asking the cluster.
const CLUSTER_SCOPED: &[(&str, &str)] = &[
    ("", "nodes"),
    ("", "namespaces"),
    ("", "persistentvolumes"),
    ("", "componentstatuses"),
    ("rbac.authorization.k8s.io", "clusterroles"),
    ("rbac.authorization.k8s.io", "clusterrolebindings"),
    ("apiextensions.k8s.io", "customresourcedefinitions"),
    ("storage.k8s.io", "storageclasses"),
    ("storage.k8s.io", "volumeattachments"),
    ("storage.k8s.io", "csidrivers"),
    ("storage.k8s.io", "csinodes"),
    (
        "admissionregistration.k8s.io",
        "validatingwebhookconfigurations",
    ),
    (
        "admissionregistration.k8s.io",
        "mutatingwebhookconfigurations",
    ),
    ("apiregistration.k8s.io", "apiservices"),
    ("certificates.k8s.io", "certificatesigningrequests"),
    ("scheduling.k8s.io", "priorityclasses"),
    ("node.k8s.io", "runtimeclasses"),
    ("networking.k8s.io", "ingressclasses"),
];

/// One resource a cluster serves, from an `APIResourceList`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Served {
    pub group: String,
    pub resource: String,
    pub namespaced: bool,
}

/// What the cluster's discovery documents say it serves (preferred versions).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DiscoveryIndex {
    served: Vec<Served>,
}

impl DiscoveryIndex {
    /// The `groupVersion`s to read from an `APIGroupList` (`/apis`): each group's preferred
    /// version (else its first), skipping malformed entries.
    pub fn preferred_group_versions(api_group_list: &serde_json::Value) -> Vec<String> {
        let groups = api_group_list
            .get("groups")
            .and_then(|g| g.as_array())
            .cloned()
            .unwrap_or_default();
        groups
            .iter()
            .filter_map(|g| {
                let preferred = g
                    .get("preferredVersion")
                    .and_then(|p| p.get("groupVersion"))
                    .and_then(|v| v.as_str());
                let first = g
                    .get("versions")
                    .and_then(|v| v.as_array())
                    .and_then(|v| v.first())
                    .and_then(|v| v.get("groupVersion"))
                    .and_then(|v| v.as_str());
                preferred
                    .or(first)
                    .filter(|gv| {
                        gv.split_once('/')
                            .is_some_and(|(g, v)| is_subdomain(g) && is_label(v))
                    })
                    .map(str::to_string)
            })
            .collect()
    }

    /// Adds the resources (not subresources) of one `APIResourceList`; `group` is "" for
    /// `/api/v1`.
    pub fn add_resource_list(&mut self, group: &str, list: &serde_json::Value) {
        let items = list
            .get("resources")
            .and_then(|r| r.as_array())
            .cloned()
            .unwrap_or_default();
        for r in items {
            let Some(name) = r
                .get("name")
                .and_then(|n| n.as_str())
                .filter(|n| is_label(n))
            else {
                continue;
            };
            let namespaced = r
                .get("namespaced")
                .and_then(|n| n.as_bool())
                .unwrap_or(false);
            let s = Served {
                group: group.to_string(),
                resource: name.to_string(),
                namespaced,
            };
            if !self.served.contains(&s) {
                self.served.push(s);
            }
        }
    }

    pub fn is_empty(&self) -> bool {
        self.served.is_empty()
    }

    /// The canonical name (`statefulsets.apps`, `pods/log`) of a scope entry. A bare name
    /// that core serves is core, as kubectl reads it; otherwise it must be served by exactly
    /// one group. Group-qualified names the cluster does not (yet) serve are kept (a CRD may
    /// be installed later) unless the cluster says they are cluster-scoped.
    pub fn resolve(&self, entry: &str) -> Result<String, NameError> {
        let mut name = ResourceName::parse(entry)?;
        name.check_not_cluster_scoped()?;
        match &name.group {
            Some(g) => {
                if self
                    .served
                    .iter()
                    .any(|s| &s.group == g && s.resource == name.resource && !s.namespaced)
                {
                    return Err(NameError::ClusterScoped(entry.to_string()));
                }
            }
            None => {
                let candidates: Vec<&Served> = self
                    .served
                    .iter()
                    .filter(|s| s.resource == name.resource)
                    .collect();
                let chosen = match candidates.iter().find(|s| s.group.is_empty()) {
                    Some(core) => *core,
                    None => match candidates.as_slice() {
                        [one] => *one,
                        [] => return Err(NameError::NotServed(entry.to_string())),
                        many => {
                            let mut groups: Vec<&str> =
                                many.iter().map(|s| s.group.as_str()).collect();
                            groups.sort_unstable();
                            groups.dedup();
                            let example = format!(
                                "{}.{}",
                                name.resource,
                                groups.first().copied().unwrap_or_default()
                            );
                            return Err(NameError::Ambiguous {
                                name: entry.to_string(),
                                groups: groups.join(", "),
                                example,
                            });
                        }
                    },
                };
                if !chosen.namespaced {
                    return Err(NameError::ClusterScoped(entry.to_string()));
                }
                name.group = Some(chosen.group.clone());
            }
        }
        Ok(name.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn index() -> DiscoveryIndex {
        let mut d = DiscoveryIndex::default();
        d.add_resource_list(
            "",
            &json!({"resources": [
                {"name": "pods", "namespaced": true}, {"name": "pods/log", "namespaced": true},
                {"name": "events", "namespaced": true}, {"name": "nodes", "namespaced": false},
            ]}),
        );
        d.add_resource_list(
            "apps",
            &json!({"resources": [{"name": "statefulsets", "namespaced": true}]}),
        );
        d.add_resource_list(
            "events.k8s.io",
            &json!({"resources": [{"name": "events", "namespaced": true}]}),
        );
        d.add_resource_list(
            "cert-manager.io",
            &json!({"resources": [{"name": "certificates", "namespaced": true}]}),
        );
        d.add_resource_list("acme.example.com", &json!({"resources": [{"name": "certificates", "namespaced": true}, {"name": "widgets", "namespaced": false}]}));
        d.add_resource_list("batch", &json!({"resources": [{"name": "jobs", "namespaced": true}, {"name": "cronjobs", "namespaced": true}]}));
        d
    }

    #[test]
    fn parses_rbac_names() {
        let n = ResourceName::parse("certificates.cert-manager.io/status").unwrap();
        assert_eq!(
            (
                n.resource.as_str(),
                n.group.as_deref(),
                n.subresource.as_str()
            ),
            ("certificates", Some("cert-manager.io"), "status")
        );
        assert_eq!(n.to_string(), "certificates.cert-manager.io/status");
        assert_eq!(
            ResourceName::parse("deployments/scale")
                .unwrap()
                .group_or_builtin(),
            "apps"
        );
        assert_eq!(
            ResourceName::parse("configmaps")
                .unwrap()
                .group_or_builtin(),
            ""
        );
        assert_eq!(
            ResourceName::parse("widgets").unwrap().group_or_builtin(),
            ""
        );
        let n = ResourceName::parse("pods/log").unwrap();
        assert_eq!((n.group, n.subresource.as_str()), (None, "log"));
        for bad in [
            "",
            "*",
            "pods/*",
            "Pods",
            "pods.",
            ".apps",
            "pods/",
            "pods//log",
            "pods/log/x",
            "a b",
            "deployments.Apps",
            "pods/ex ec",
        ] {
            assert_eq!(
                ResourceName::parse(bad),
                Err(NameError::Malformed(bad.into())),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn resolves_through_discovery() {
        let d = index();
        assert_eq!(d.resolve("statefulsets").unwrap(), "statefulsets.apps");
        assert_eq!(d.resolve("jobs").unwrap(), "jobs.batch");
        assert_eq!(d.resolve("pods/log").unwrap(), "pods/log");
        // Core wins a bare name core serves, as kubectl reads it.
        assert_eq!(d.resolve("events").unwrap(), "events");
        assert_eq!(
            d.resolve("events.events.k8s.io").unwrap(),
            "events.events.k8s.io"
        );
        assert_eq!(
            d.resolve("certificates.cert-manager.io").unwrap(),
            "certificates.cert-manager.io"
        );
        // Qualified names of CRDs not installed yet stay.
        assert_eq!(
            d.resolve("ingresses.networking.k8s.io").unwrap(),
            "ingresses.networking.k8s.io"
        );
        assert!(
            matches!(d.resolve("certificates"), Err(NameError::Ambiguous { groups, .. }) if groups == "acme.example.com, cert-manager.io")
        );
        assert_eq!(
            d.resolve("gadgets"),
            Err(NameError::NotServed("gadgets".into()))
        );
        assert_eq!(
            d.resolve("nodes"),
            Err(NameError::ClusterScoped("nodes".into()))
        );
        assert_eq!(
            d.resolve("widgets"),
            Err(NameError::ClusterScoped("widgets".into()))
        );
        assert_eq!(
            d.resolve("widgets.acme.example.com"),
            Err(NameError::ClusterScoped("widgets.acme.example.com".into()))
        );
        assert_eq!(
            d.resolve("clusterroles.rbac.authorization.k8s.io"),
            Err(NameError::ClusterScoped(
                "clusterroles.rbac.authorization.k8s.io".into()
            ))
        );
    }

    #[test]
    fn preferred_versions_from_a_group_list() {
        let list = json!({"groups": [
            {"name": "apps", "versions": [{"groupVersion": "apps/v1"}], "preferredVersion": {"groupVersion": "apps/v1"}},
            {"name": "batch", "versions": [{"groupVersion": "batch/v1"}]},
            {"name": "bad", "preferredVersion": {"groupVersion": "../x"}},
            "junk",
        ]});
        assert_eq!(
            DiscoveryIndex::preferred_group_versions(&list),
            ["apps/v1", "batch/v1"]
        );
        assert!(DiscoveryIndex::preferred_group_versions(&json!(null)).is_empty());
    }
}
