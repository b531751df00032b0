"""LlmImage: the server image, built and (optionally) pushed, or passed through.

Two builders behind one component, chosen by what the build needs:

* no build secrets: pulumi-docker's `docker.Image` (talks to any Docker daemon, minikube's
  included, and can leave the image unpushed with `skip_push`);
* build secrets (a gated model's Hugging Face token for baked weights): pulumi-docker-build's
  `docker_build.Image`, whose `secrets` reach BuildKit as `--mount=type=secret` files. They are
  never build arguments (those stay in the image history) and the provider stores them as
  Pulumi secrets, so state holds them encrypted. pulumi-docker 5.x has no way to pass one.
"""

from __future__ import annotations

from typing import Mapping, NotRequired, TypedDict

import pulumi
import pulumi_docker as docker
import pulumi_docker_build as docker_build

HF_TOKEN_BUILD_SECRET = "hf_token"
"""BuildKit secret id the Dockerfiles mount for the model download (`--mount=type=secret,id=...`)."""


class LlmImageArgs(TypedDict):
    build: bool
    """Build from `context`; False passes `reference` through untouched."""
    reference: NotRequired[str]
    """Prebuilt image to run when `build` is False."""
    image_name: NotRequired[str]
    """Name to tag the build with: [registry/]repository:tag."""
    context: NotRequired[str]
    """Build context directory."""
    dockerfile: NotRequired[str]
    """Dockerfile path (absolute, or relative to the working directory)."""
    platform: NotRequired[str | None]
    """Target platform, e.g. linux/amd64."""
    push: NotRequired[bool]
    """Push to the registry; False leaves the image in the local Docker daemon."""
    build_args: NotRequired[Mapping[str, str]]
    """Dockerfile ARGs (BASE_IMAGE, MODEL_ID, ...). Never secrets: they stay in the image history."""
    build_secrets: NotRequired[Mapping[str, pulumi.Input[str]]]
    """BuildKit secrets by id (the Dockerfile's `--mount=type=secret,id=<id>`), e.g. hf_token."""


class LlmImage(pulumi.ComponentResource):
    ref: pulumi.Output[str]
    """Reference a pod should run: a registry digest when pushed, so a rebuild rolls the pods."""
    content_id: pulumi.Output[str]
    """Changes whenever the image content changes; a pod annotation, for unpushed images."""

    def __init__(
        self, name: str, args: LlmImageArgs, opts: pulumi.ResourceOptions | None = None
    ) -> None:
        super().__init__("llm-serving:index:LlmImage", name, None, opts)
        if args["build"]:
            for key in ("image_name", "context"):
                if not args.get(key):
                    raise ValueError(f"LlmImage: '{key}' is required when 'build' is True")
            if args.get("build_secrets"):
                self.ref, self.content_id = self._build_with_secrets(name, args)
            else:
                self.ref, self.content_id = self._build(name, args)
        else:
            reference = args.get("reference")
            if not reference:
                raise ValueError("LlmImage: 'reference' is required when 'build' is False")
            if args.get("build_secrets"):
                raise ValueError("LlmImage: 'build_secrets' need 'build' True")
            self.ref = pulumi.Output.from_input(reference)
            self.content_id = self.ref
        self.register_outputs({"ref": self.ref, "content_id": self.content_id})

    def _build(self, name: str, args: LlmImageArgs) -> tuple[pulumi.Output[str], pulumi.Output[str]]:
        push = args.get("push", False)
        build: docker.DockerBuildArgsDict = {
            "context": args["context"],
            "args": dict(args.get("build_args", {})),
        }
        if args.get("dockerfile"):
            build["dockerfile"] = args["dockerfile"]
        if args.get("platform"):
            build["platform"] = args["platform"]
        image = docker.Image(
            f"{name}-image",
            image_name=args["image_name"],
            build=build,
            skip_push=not push,
            # Building a multi-GB image on every preview would make previews unusable.
            build_on_preview=False,
            opts=pulumi.ResourceOptions(parent=self),
        )
        if push:
            # repository@sha256:...: immutable, so a rebuild changes the pod spec.
            return image.repo_digest, image.repo_digest
        # Unpushed (minikube's daemon): pods run the tag; the local image id,
        # carried as a pod annotation, still rolls them on a rebuild.
        return image.image_name, image.repo_digest

    def _build_with_secrets(
        self, name: str, args: LlmImageArgs
    ) -> tuple[pulumi.Output[str], pulumi.Output[str]]:
        push = args.get("push", False)
        image = docker_build.Image(
            f"{name}-build",
            tags=[args["image_name"]],
            context={"location": args["context"]},
            dockerfile={"location": args["dockerfile"]} if args.get("dockerfile") else None,
            platforms=[args["platform"]] if args.get("platform") else None,
            build_args=dict(args.get("build_args", {})),
            # The provider wraps these in Output.secret and marks them secret outputs.
            secrets=dict(args["build_secrets"]),
            push=push,
            # Unpushed: load the result into the local daemon (minikube's, via docker-env).
            load=not push,
            build_on_preview=False,
            opts=pulumi.ResourceOptions(parent=self),
        )
        if push:
            # tag@sha256:... of the pushed image.
            return image.ref, image.digest
        return pulumi.Output.from_input(args["image_name"]), image.context_hash
