//! Kubelet, emulated: the CRI calls kubelet makes for a pod, as a test client. Image calls go to
//! the image-service endpoint (dfsnapshotter's proxy, kubelet's `--image-service-endpoint`),
//! runtime calls to containerd's CRI (`--container-runtime-endpoint`). Each call opens a new
//! connection, and one refused because a daemon is still (re)starting is tried again for a while,
//! as kubelet's retries would.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use fetcher::uds::lazy_channel;
use proto::cri::image_service_client::ImageServiceClient;
use proto::cri::runtime_service_client::RuntimeServiceClient;
use proto::cri::{
    AuthConfig, ContainerConfig, ContainerMetadata, CreateContainerRequest, ExecSyncRequest,
    ImageSpec, ImageStatusRequest, ImageStatusResponse, LinuxPodSandboxConfig,
    LinuxSandboxSecurityContext, NamespaceMode, NamespaceOption, PodSandboxConfig,
    PodSandboxMetadata, PullImageRequest, PullImageResponse, RemoveContainerRequest,
    RemoveImageRequest, RemovePodSandboxRequest, RunPodSandboxRequest, StartContainerRequest,
    StopContainerRequest, StopPodSandboxRequest,
};
use tonic::Status;

/// A kubelet's two CRI endpoints, and where its pods' logs go.
pub struct Kubelet {
    pub image_service: PathBuf,
    pub runtime: PathBuf,
    pub log_dir: PathBuf,
}

/// A pod sandbox that runs.
pub struct Pod {
    pub id: String,
    config: PodSandboxConfig,
}

/// Whether the registry refused a pull's credentials.
pub fn unauthorized(s: &Status) -> bool {
    s.message().contains("401") || s.message().contains("nauthorized")
}

fn spec(image: &str) -> Option<ImageSpec> {
    Some(ImageSpec {
        image: image.to_owned(),
        ..Default::default()
    })
}

/// Whether a call failed because its server, or the server behind it, was not there yet.
fn refused_dial(s: &Status) -> bool {
    s.code() == tonic::Code::Unavailable || s.message().contains("dial")
}

/// `call()` again every half second while it fails with a refused dial, for up to 30 s.
async fn retry<T, F: Future<Output = Result<T, Status>>>(
    mut call: impl FnMut(u32) -> F,
) -> Result<T, Status> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut attempt = 0;
    loop {
        match call(attempt).await {
            Err(s) if refused_dial(&s) && Instant::now() < deadline => {
                attempt += 1;
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            r => return r,
        }
    }
}

impl Kubelet {
    fn images(&self) -> ImageServiceClient<tonic::transport::Channel> {
        ImageServiceClient::new(lazy_channel(&self.image_service))
    }

    fn runtime(&self) -> RuntimeServiceClient<tonic::transport::Channel> {
        RuntimeServiceClient::new(lazy_channel(&self.runtime))
    }

    /// `PullImage` of `image` with a pull secret `auth` (user, password) as kubelet sends it.
    pub async fn pull_image(
        &self,
        image: &str,
        auth: Option<(&str, &str)>,
    ) -> Result<PullImageResponse, Status> {
        retry(|_| async move {
            let req = PullImageRequest {
                image: spec(image),
                auth: auth.map(|(username, password)| AuthConfig {
                    username: username.into(),
                    password: password.into(),
                    ..Default::default()
                }),
            };
            Ok(self.images().pull_image(req).await?.into_inner())
        })
        .await
    }

    pub async fn image_status(&self, image: &str) -> Result<ImageStatusResponse, Status> {
        let req = ImageStatusRequest {
            image: spec(image),
            verbose: false,
        };
        Ok(self.images().image_status(req).await?.into_inner())
    }

    /// `RemoveImage`, as kubelet's image GC calls it.
    pub async fn remove_image(&self, image: &str) -> Result<(), Status> {
        let req = RemoveImageRequest { image: spec(image) };
        self.images().remove_image(req).await.map(|_| ())
    }

    /// `RunPodSandbox` of a pod `name` with host networking (no CNI needed).
    pub async fn run_pod(&self, name: &str) -> Result<Pod, Status> {
        let node = NamespaceMode::Node as i32;
        let config = PodSandboxConfig {
            metadata: Some(PodSandboxMetadata {
                name: name.into(),
                uid: format!("uid-{name}"),
                namespace: "default".into(),
                attempt: 0,
            }),
            log_directory: self.log_dir.join(name).to_string_lossy().into_owned(),
            linux: Some(LinuxPodSandboxConfig {
                security_context: Some(LinuxSandboxSecurityContext {
                    namespace_options: Some(NamespaceOption {
                        network: node,
                        ..Default::default()
                    }),
                }),
            }),
            ..Default::default()
        };
        std::fs::create_dir_all(&config.log_directory).expect("pod log directory");
        let req = RunPodSandboxRequest {
            config: Some(config.clone()),
            runtime_handler: String::new(),
        };
        let id = self
            .runtime()
            .run_pod_sandbox(req)
            .await?
            .into_inner()
            .pod_sandbox_id;
        Ok(Pod { id, config })
    }

    /// `CreateContainer` + `StartContainer` of container `name` of `image` running `command` in
    /// `pod`; its id. Its output goes to [`Kubelet::container_log`].
    pub async fn start_container(
        &self,
        pod: &Pod,
        name: &str,
        image: &str,
        command: &[&str],
    ) -> Result<String, Status> {
        let id = retry(|attempt| async move {
            let req = CreateContainerRequest {
                pod_sandbox_id: pod.id.clone(),
                config: Some(ContainerConfig {
                    metadata: Some(ContainerMetadata {
                        name: name.into(),
                        attempt,
                    }),
                    image: spec(image),
                    command: command.iter().map(|s| (*s).to_owned()).collect(),
                    log_path: format!("{name}.log"),
                    ..Default::default()
                }),
                sandbox_config: Some(pod.config.clone()),
            };
            Ok(self
                .runtime()
                .create_container(req)
                .await?
                .into_inner()
                .container_id)
        })
        .await?;
        let req = StartContainerRequest {
            container_id: id.clone(),
        };
        self.runtime().start_container(req).await?;
        Ok(id)
    }

    /// What container `name` of `pod` has written so far (CRI log lines without their
    /// timestamp and stream tags).
    pub fn container_log(&self, pod: &Pod, name: &str) -> String {
        let path = Path::new(&pod.config.log_directory).join(format!("{name}.log"));
        std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.splitn(4, ' ').nth(3))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// `ExecSync` of `cmd` in container `id`: its exit code and stdout + stderr.
    pub async fn exec(&self, id: &str, cmd: &[&str]) -> Result<(i32, String), Status> {
        let req = ExecSyncRequest {
            container_id: id.into(),
            cmd: cmd.iter().map(|s| (*s).to_owned()).collect(),
            timeout: 60,
        };
        let r = self.runtime().exec_sync(req).await?.into_inner();
        let mut out = String::from_utf8_lossy(&r.stdout).into_owned();
        out.push_str(&String::from_utf8_lossy(&r.stderr));
        Ok((r.exit_code, out))
    }

    /// Stops and removes `containers` and then `pod`, as kubelet does when a pod is deleted.
    pub async fn delete_pod(&self, pod: Pod, containers: &[String]) -> Result<(), Status> {
        for id in containers {
            let stop = StopContainerRequest {
                container_id: id.clone(),
                timeout: 0,
            };
            self.runtime().stop_container(stop).await?;
            let rm = RemoveContainerRequest {
                container_id: id.clone(),
            };
            self.runtime().remove_container(rm).await?;
        }
        let stop = StopPodSandboxRequest {
            pod_sandbox_id: pod.id.clone(),
        };
        self.runtime().stop_pod_sandbox(stop).await?;
        let rm = RemovePodSandboxRequest {
            pod_sandbox_id: pod.id,
        };
        self.runtime().remove_pod_sandbox(rm).await.map(|_| ())
    }
}
