//! Building a Kubernetes client the way both agents do (feature `kube`).

use std::path::Path;

use anyhow::Context as _;

/// A client from `kubeconfig`, or, when absent, from the environment: in-cluster config (or
/// `$KUBECONFIG` / `~/.kube/config` when run outside a cluster).
pub async fn kube_client(kubeconfig: Option<&Path>) -> anyhow::Result<kube::Client> {
    let config = match kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("reading kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &Default::default())
                .await
                .with_context(|| format!("using kubeconfig {}", path.display()))?
        }
        None => kube::Config::infer()
            .await
            .context("no --kubeconfig and no in-cluster config")?,
    };
    kube::Client::try_from(config).context("building the Kubernetes client")
}
