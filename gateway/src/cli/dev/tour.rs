//! The tour `postern dev` prints: copy-pasteable commands for every resource that came up, an
//! approval, and both trails.

use super::appliance::{
    DemoAgent, CUSTOMER, ECHO_RESOURCE, KUBE_RESOURCE, PG_RESOURCE, SSH_RESOURCE,
};
use std::fmt::Write;

pub struct TourInput<'a> {
    pub postern: &'a str,
    pub agent_bin: &'a str,
    pub api: String,
    pub relay: String,
    pub ca_fingerprint: &'a str,
    pub ca_file: String,
    pub admin_token_file: String,
    pub approver_token_file: String,
    pub approver_key: String,
    pub run_dir: String,
    pub auto: &'a DemoAgent,
    pub manual: &'a DemoAgent,
    pub kube: bool,
    pub postgres: bool,
    pub ssh: bool,
    pub skipped: &'a [(&'static str, String)],
}

pub fn text(t: &TourInput) -> String {
    let (me, auto, manual) = (t.postern, t.auto.app, t.manual.app);
    let on =
        |app: &str, r: &str| format!("--app {app} --customer {CUSTOMER} --origin-resource-id {r}");
    let mut s = format!(
        "\nPostern dev is up: gateway, embedded store, and two demo appliances of {CUSTOMER} online:\n\
         \n  {auto:<11} policy automatic  {}  (agent {}, log {})\
         \n  {manual:<11} policy manual     {}  (agent {}, log {})\n\
         \n  API    https://{}\n  relay  udp {}\n  CA     {}\n  demo resources  {}\n",
        t.auto.appliance_id, t.auto.config.display(), t.auto.log.display(),
        t.manual.appliance_id, t.manual.config.display(), t.manual.log.display(),
        t.api, t.relay, t.ca_fingerprint, t.run_dir,
    );
    for (what, note) in t.skipped {
        let _ = write!(s, "\n  skipped {what}: {note}");
    }
    let _ = write!(
        s,
        "\n\nTry, in another shell (each `endpoint create` prints the line to connect with):\n\
         \n  export POSTERN_ADDR={} POSTERN_CA_FILE={} POSTERN_TOKEN=$(cat {})\
         \n  {me} appliance list\
         \n  {me} access request --app {auto} --customer {CUSTOMER} --level operate --duration 1h --reason \"trying Postern\"",
        t.api, t.ca_file, t.admin_token_file,
    );
    if t.kube {
        let _ = write!(
            s,
            "\n\n  # kubectl through a generated kubeconfig\
             \n  {me} ops endpoint create --type kubectl {} --ttl 30m\
             \n  KUBECONFIG=<the kubeconfig it wrote> kubectl get pods",
            on(auto, KUBE_RESOURCE)
        );
    }
    if t.postgres {
        let _ = write!(
            s,
            "\n\n  # psql through a connection string (scope: schema app)\
             \n  {me} ops endpoint create --type postgres {} --ttl 30m\
             \n  psql \"<the connection string it printed>\" -c 'select * from app.items'",
            on(auto, PG_RESOURCE)
        );
    }
    if t.ssh {
        let _ = write!(
            s,
            "\n\n  # ssh through the generated config\
             \n  {me} ops endpoint create --type ssh {} --ttl 30m\
             \n  ssh -F ~/.ssh/postern/config <the alias it printed> hostname",
            on(auto, SSH_RESOURCE)
        );
    }
    let _ = write!(
        s,
        "\n\n  # a tcp service, forwarded locally with the endpoint's client certificate\
         \n  {me} ops endpoint create --type tcp {} --ttl 30m\
         \n  {me} ops endpoint connect <endpoint id> --listen 127.0.0.1:7001   # then talk to 127.0.0.1:7001: it echoes",
        on(auto, ECHO_RESOURCE)
    );
    if t.kube {
        let _ = write!(
            s,
            "\n\n  # a one-off op, run in the appliance\
             \n  {me} ops kubectl {} --command \"kubectl get pods\" --wait",
            on(auto, KUBE_RESOURCE)
        );
    }
    let _ = write!(
        s,
        "\n\n  # an approval: {manual}'s customer decides, signing with the approver key its agent.toml lists\
         \n  {me} access request --app {manual} --customer {CUSTOMER} --level operate --duration 1h --reason \"trying approvals\"\
         \n  POSTERN_TOKEN=$(cat {tok}) {me} approvals list\
         \n  POSTERN_TOKEN=$(cat {tok}) {me} approvals approve <grant id> --key {key} --message \"go ahead\"\
         \n  {me} access list",
        tok = t.approver_token_file,
        key = t.approver_key,
    );
    if t.kube {
        let _ = write!(
            s,
            "\n  # its ops wait for two approvals the same way: the command, then the output\
             \n  {me} ops kubectl {} --command \"kubectl get pods\"\
             \n  POSTERN_TOKEN=$(cat {tok}) {me} approvals approve <op id> --key {key}   # twice\
             \n  {me} ops get <op id>",
            on(manual, KUBE_RESOURCE),
            tok = t.approver_token_file,
            key = t.approver_key,
        );
    }
    let _ = write!(
        s,
        "\n\n  # the vendor's trail, and the customer's own in the appliance\
         \n  {me} audit list\
         \n  {me} audit verify\
         \n  tail -n 5 {}\
         \n  {} audit verify --config {}\
         \n\nCtrl-C stops everything.\n",
        t.auto.trail.display(),
        t.agent_bin,
        t.auto.config.display(),
    );
    s
}
