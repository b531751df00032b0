"""LlmImage: the server image, built with pulumi-docker or passed through."""

from __future__ import annotations

from typing import Mapping, NotRequired, TypedDict

import pulumi
import pulumi_docker as docker


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
            self.ref, self.content_id = self._build(name, args)
        else:
            reference = args.get("reference")
            if not reference:
                raise ValueError("LlmImage: 'reference' is required when 'build' is False")
            self.ref = pulumi.Output.from_input(reference)
            self.content_id = self.ref
        self.register_outputs({"ref": self.ref, "content_id": self.content_id})

    def _build(self, name: str, args: LlmImageArgs) -> tuple[pulumi.Output[str], pulumi.Output[str]]:
        for key in ("image_name", "context"):
            if not args.get(key):
                raise ValueError(f"LlmImage: '{key}' is required when 'build' is True")
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
