"""Starting the engine and the HTTP server, and stopping both cleanly."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
from collections.abc import Callable
from pathlib import Path

from molink.api import ApiConfig, create_app
from molink.api.context import ChatOptions
from molink.api.cors import CorsPolicy
from molink.api.metrics import MetricSource
from molink.api.sampling import GENERATION_DEFAULT_FIELDS
from molink.api.server import HttpsFiles, serve_app
from molink.cli.args import EngineArgs
from molink.cli.vllm_args import override_generation_config
from molink.engine.protocol import EngineClient
from molink.errors import MolinkError
from molink.limits import LIMITS
from molink.quant.memory import RESIDENT, return_freed_memory

logger = logging.getLogger(__name__)

EngineFactory = Callable[[EngineArgs], EngineClient]
_LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format=_LOG_FORMAT)
    # basicConfig does nothing when logging is already set up; the level still applies.
    logging.getLogger().setLevel(level.upper())


def default_engine_factory(args: EngineArgs) -> EngineClient:
    # Imported here: the engine pulls in torch and the model code, which --help never needs.
    from molink.cli.engine_builder import build_engine_client

    return build_engine_client(args)


def apply_thread_count(args: EngineArgs) -> None:
    if args.num_threads is None:
        return
    import torch

    torch.set_num_threads(args.num_threads)


def run_server(args: EngineArgs, engine_factory: EngineFactory | None = None) -> int:
    """Builds the engine, serves until SIGINT/SIGTERM, returns the exit status."""
    configure_logging(args.log_level)
    # Until uvicorn installs its own handlers, a SIGTERM (e.g. while weights load) stops the
    # process as Ctrl-C does, so it still exits cleanly.
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        apply_thread_count(args)
        return asyncio.run(_serve(args, engine_factory or default_engine_factory))
    except KeyboardInterrupt:
        logger.info("interrupted; stopping")
        return 0
    except MolinkError as exc:
        logger.error("%s", exc)
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)


async def _serve(args: EngineArgs, engine_factory: EngineFactory) -> int:
    # Files the flags name are read first: a wrong path fails now, not once the model has
    # loaded (minutes for a large one).
    chat_template = read_chat_template(args.chat_template)
    folder_defaults = _folder_generation_defaults(
        _generation_setting(args), args.override_generation_config
    )
    # The engine is built inside the running loop, so it may start tasks of its own.
    engine = engine_factory(args)
    try:
        return_freed_memory()  # what building the engine freed (molink.quant.memory)
        names = served_names(args, engine.model_name)
        for note in args.ignored_flags():
            logger.info("%s", note)
        if folder_defaults is None:
            folder_defaults = generation_defaults(
                args.generation_config, engine, args.override_generation_config
            )
        chat = chat_options(args, chat_template, folder_defaults)
        app = create_app(engine, api_config(args, names, _metric_sources(engine), chat))
        tls = https_files(args)
        scheme = "https" if tls else "http"
        logger.info("serving %s on %s://%s:%d", names[0], scheme, args.host, args.port)
        server = await serve_app(
            app,
            args.host,
            args.port,
            args.log_level,
            tls=tls,
            root_path=args.root_path or "",
            access_log=not args.disable_uvicorn_access_log,
        )
    finally:
        await _close_engine(engine)
    return 0 if server.started else 1


def api_config(
    args: EngineArgs,
    names: tuple[str, ...],
    metric_sources: tuple[MetricSource, ...],
    chat: ChatOptions,
) -> ApiConfig:
    return ApiConfig(
        served_model_names=names,
        api_key=args.api_key,
        metric_sources=metric_sources,
        chat=chat,
        cors=cors_policy(args),
        disable_docs=args.disable_fastapi_docs,
        request_id_headers=args.enable_request_id_headers,
    )


def https_files(args: EngineArgs) -> HttpsFiles | None:
    if args.ssl_keyfile is None or args.ssl_certfile is None:
        return None
    return HttpsFiles(args.ssl_keyfile, args.ssl_certfile, args.ssl_ca_certs, args.ssl_cert_reqs)


def served_names(args: EngineArgs, engine_model_name: str) -> tuple[str, ...]:
    """The names requests may give as "model": --served-model-name's (the first is the one
    responses carry), then the engine's own; each once."""
    names = (args.model_name, *args.served_model_aliases, engine_model_name)
    return tuple(dict.fromkeys(names))


def cors_policy(args: EngineArgs) -> CorsPolicy | None:
    """What --allowed-origins and friends allow; None when no origin is named."""
    if not args.allowed_origins:
        return None
    return CorsPolicy(
        args.allowed_origins, args.allow_credentials, args.allowed_methods, args.allowed_headers
    )


def chat_options(args: EngineArgs, chat_template: str | None, defaults: dict) -> ChatOptions:
    return ChatOptions(
        chat_template=chat_template,
        trust_request_chat_template=args.trust_request_chat_template,
        tool_call_parser=args.tool_call_parser,
        enable_auto_tool_choice=args.enable_auto_tool_choice,
        generation_defaults=defaults,
        max_logprobs=LIMITS.max_logprobs if args.max_logprobs == -1 else args.max_logprobs,
        response_role=args.response_role,
        reasoning_parser=args.reasoning_parser,
        return_tokens_as_token_ids=args.return_tokens_as_token_ids,
        chat_template_content_format=args.chat_template_content_format,
        force_include_usage=args.enable_force_include_usage,
    )


def _generation_setting(args: EngineArgs) -> str:
    """'auto' reads the folder the engine's tokenizer came from: with --tokenizer that is
    not the model's, so the model's folder is named instead (a hub model's is not known
    here: its defaults are then left out, and said so)."""
    if args.generation_config != "auto" or args.tokenizer is None:
        return args.generation_config
    folder = Path(args.model) if args.model is not None else None
    if folder is not None and (folder / "generation_config.json").is_file():
        return str(folder)
    if folder is None or not folder.is_dir():
        logger.warning(
            "--tokenizer: the model's generation_config.json is not read (its folder is not "
            "known here); pass it with --generation-config FOLDER"
        )
    return "vllm"


def _folder_generation_defaults(setting: str, override: str | None) -> dict | None:
    """The defaults of --generation-config FOLDER or 'vllm'; None for 'auto' (the model's
    folder is known once the engine is built)."""
    if setting == "auto":
        return None
    return generation_defaults(setting, None, override)


def read_chat_template(value: str | None) -> str | None:
    """--chat-template takes a file or the template itself, as vLLM's does."""
    if value is None:
        return None
    path = Path(value)
    if not path.is_file():
        if "{" not in value:
            raise MolinkError(f"--chat-template: {value} is neither a file nor a template")
        return value
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise MolinkError(f"--chat-template: cannot read {value}: {exc}") from exc


def generation_defaults(
    setting: str, engine: EngineClient | None, override: str | None = None
) -> dict:
    """Sampling defaults of generation_config.json: the model's ('auto'), a folder's, or none
    ('vllm'), with --override-generation-config's object laid over it, as vLLM does. Only
    the fields vLLM takes from it, max_new_tokens as max_tokens."""
    config, source = _generation_config(setting, engine)
    if override is not None:
        config.update(override_generation_config(override))
        source += " and --override-generation-config"
    defaults = {k: config[k] for k in GENERATION_DEFAULT_FIELDS if k in config}
    max_new_tokens = config.get("max_new_tokens")
    if max_new_tokens is not None:
        # transformers' max_new_tokens is vLLM's max_tokens; other values would fail every
        # request that left max_tokens out, so they are left out (and said so).
        if type(max_new_tokens) is int and max_new_tokens >= 1:
            defaults["max_tokens"] = max_new_tokens
        else:
            logger.warning(
                "%s: max_new_tokens %r is not a token count; ignored", source, max_new_tokens
            )
    if defaults:
        logger.info("sampling defaults from %s: %s", source, defaults)
    return defaults


def _generation_config(setting: str, engine: EngineClient | None) -> tuple[dict, str]:
    """The generation_config.json --generation-config names, and where it came from."""
    if setting == "vllm":
        return {}, "--generation-config vllm"
    if setting == "auto":
        assert engine is not None, "'auto' reads the folder the engine's model came from"
        folder = Path(engine.tokenizer.name_or_path)
    else:
        folder = Path(setting)
    path = folder / "generation_config.json"
    if not path.exists():
        if setting != "auto":
            raise MolinkError(f"--generation-config: {path} does not exist")
        return {}, str(path)
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise MolinkError(f"--generation-config: cannot read {path}: {exc}") from exc
    if not isinstance(config, dict):
        raise MolinkError(f"--generation-config: {path} does not hold a JSON object")
    return config, str(path)


def _metric_sources(engine: EngineClient) -> tuple[MetricSource, ...]:
    """The engine's own lines (e.g. per-link bandwidth), then the resident weight and
    KV-cache bytes of the stages in this process."""
    return (engine.metric_lines, RESIDENT.metric_lines)


async def _close_engine(engine: EngineClient) -> None:
    """Stops the engine's own loop and stages (off the event loop: it joins threads)."""
    try:
        await asyncio.to_thread(engine.shutdown)
    except Exception:
        logger.exception("stopping the engine failed")
