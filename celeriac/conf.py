"""Configuration: Celery's lower-case setting names, their defaults, and warnings for
names celeriac does not know.

``CELERY_SETTING_NAMES`` lists every setting Celery 5.7 defines.  A name in it
that celeriac does not implement is accepted with a one-time warning saying it
has no effect; a name in neither list is reported as unknown.
"""

from __future__ import annotations

import copy
import importlib
import sys
import warnings
from collections.abc import Iterable, Mapping
from datetime import timedelta
from typing import Any
from urllib.parse import urlsplit, urlunsplit

#: Settings celeriac implements, with their defaults (Celery's, where Celery has one).
DEFAULTS: dict[str, Any] = {
    "broker_url": None,
    "broker_transport_options": {},
    "result_backend": None,
    "result_serializer": "json",
    "result_accept_content": None,
    "result_expires": timedelta(days=1),
    "result_extended": False,
    "task_serializer": "json",
    "accept_content": ["json"],
    "task_track_started": False,
    "task_ignore_result": False,
    "task_default_queue": "celery",
    "task_default_exchange": None,
    "task_default_exchange_type": "direct",
    "task_default_routing_key": None,
    "task_default_priority": None,
    "task_queue_max_priority": None,
    "task_routes": None,
    "task_queues": None,
    "task_publish_retry": True,
    "task_publish_retry_policy": {"max_retries": 3, "interval_start": 0,
                                  "interval_step": 0.2, "interval_max": 0.2},
    "broker_connection_retry": True,
    "broker_connection_retry_on_startup": None,  # None: as broker_connection_retry
    "broker_connection_max_retries": 100,
    "broker_connection_timeout": 4.0,
    "result_persistent": None,
    "result_backend_transport_options": {},  # Redis results: global_keyprefix
    "task_acks_late": False,
    "task_time_limit": None,  # seconds; the worker's default for tasks without one
    "task_soft_time_limit": None,
    "task_always_eager": False,
    "task_eager_propagates": False,
    "worker_prefetch_multiplier": 4,
    "worker_concurrency": None,
    "imports": (),
    "include": (),
    "timezone": None,
    "enable_utc": True,
}

CELERY_SETTING_NAMES = frozenset("""
accept_content arangodb_backend_settings azureblockblob_base_path
azureblockblob_connection_timeout azureblockblob_container_name azureblockblob_read_timeout
azureblockblob_retry_increment_base azureblockblob_retry_initial_backoff_sec
azureblockblob_retry_max_attempts beat_cron_starting_deadline beat_enable_remote_control
beat_max_loop_interval beat_remote_control_max_tick_age beat_schedule beat_schedule_filename
beat_scheduler beat_sync_every broker_channel_error_retry broker_connection_max_retries
broker_connection_retry broker_connection_retry_on_startup broker_connection_timeout
broker_failover_strategy broker_heartbeat broker_heartbeat_checkrate broker_host
broker_login_method broker_native_delayed_delivery_queue_type broker_password
broker_pool_acquire_timeout broker_pool_limit broker_port broker_read_url broker_transport
broker_transport_options broker_url broker_use_ssl broker_user broker_vhost broker_write_url
cache_backend cache_backend_options cassandra_auth_kwargs cassandra_auth_provider
cassandra_bundle_path cassandra_entry_ttl cassandra_keyspace cassandra_options cassandra_port
cassandra_read_consistency cassandra_servers cassandra_table cassandra_write_consistency
control_exchange control_queue_durable control_queue_exclusive control_queue_expires
control_queue_ttl cosmosdbsql_collection_name cosmosdbsql_consistency_level
cosmosdbsql_database_name cosmosdbsql_max_retry_attempts cosmosdbsql_max_retry_wait_time
couchbase_backend_settings database_create_tables_at_setup database_engine_callback
database_engine_options database_short_lived_sessions database_table_names
database_table_schemas database_url elasticsearch_max_retries elasticsearch_retry_on_timeout
elasticsearch_save_meta_as_text elasticsearch_timeout enable_utc event_exchange
event_queue_durable event_queue_exclusive event_queue_expires event_queue_prefix event_queue_ttl
event_serializer gcs_base_path gcs_bucket gcs_project gcs_ttl imports include
mongodb_backend_settings redis_backend_use_ssl redis_db redis_host redis_max_connections
redis_password redis_port redis_retry_on_timeout redis_socket_connect_timeout
redis_socket_keepalive redis_socket_timeout redis_username result_accept_content result_backend
result_backend_always_retry result_backend_base_sleep_between_retries_ms
result_backend_max_retries result_backend_max_sleep_between_retries_ms
result_backend_transport_options result_cache_max result_chord_expires result_chord_join_timeout
result_chord_retry_interval result_compression result_exchange result_exchange_type
result_expires result_extended result_failure_expires result_persistent result_serializer
s3_access_key_id s3_base_path s3_bucket s3_endpoint_url s3_region s3_secret_access_key
security_cert_store security_certificate security_digest security_key security_key_password
task_acks_late task_acks_on_failure task_acks_on_failure_or_timeout task_acks_on_timeout
task_allow_error_cb_on_chord_header task_always_eager task_annotations task_compression
task_create_missing_queue_exchange_type task_create_missing_queue_type
task_create_missing_queues task_default_delivery_mode task_default_exchange
task_default_exchange_type task_default_priority task_default_queue task_default_queue_type
task_default_rate_limit task_default_routing_key task_eager_propagates task_ignore_result
task_inherit_parent_priority task_protocol task_publish_retry task_publish_retry_policy
task_queue_max_priority task_queues task_reject_on_worker_lost task_remote_tracebacks
task_repr_maxlevels task_retry_on_worker_lost task_routes task_send_sent_event task_serializer
task_soft_time_limit task_store_eager_result task_store_errors_even_if_ignored task_time_limit
task_track_started timezone worker_agent worker_autoscaler
worker_cancel_long_running_tasks_on_connection_loss worker_concurrency worker_consumer
worker_deduplicate_successful_tasks worker_detect_quorum_queues worker_direct
worker_disable_prefetch worker_disable_rate_limits worker_enable_prefetch_count_reduction
worker_enable_remote_control worker_enable_soft_shutdown_on_idle worker_eta_task_limit
worker_hijack_root_logger worker_log_color worker_log_datefmt worker_log_format worker_lost_wait
worker_max_memory_per_child worker_max_tasks_per_child worker_pool worker_pool_putlocks
worker_pool_restarts worker_pool_start_method worker_prefetch_multiplier
worker_proc_alive_timeout worker_redirect_stdouts worker_redirect_stdouts_level
worker_send_task_events worker_soft_shutdown_timeout worker_state_db worker_task_log_datefmt
worker_task_log_format worker_timer worker_timer_precision
""".split())  # noqa: SIM905

_warned: set[str] = set()


def warn_once(key: str, message: str) -> None:
    """Warn ``message`` (a UserWarning) the first time ``key`` comes up in this process,
    pointing at the first caller outside celeriac."""
    if key in _warned:
        return
    _warned.add(key)
    frame, level = sys._getframe(1), 2
    while frame.f_back is not None and \
            frame.f_globals.get("__name__", "").partition(".")[0] == "celeriac":
        frame, level = frame.f_back, level + 1
    warnings.warn(message, UserWarning, stacklevel=level)


def _warn_setting(name: str) -> None:
    if name in CELERY_SETTING_NAMES:
        msg = f"setting {name!r} is a Celery setting celeriac does not implement; it has no effect"
    else:
        msg = f"unknown setting {name!r}: neither celeriac nor Celery has a setting of that name"
    warn_once(name, msg)


class Settings(dict[str, Any]):
    """``app.conf``: a dict of settings, readable as attributes (``app.conf.broker_url``)."""

    def __init__(self, values: Mapping[str, Any] | None = None) -> None:
        # each app gets its own copy of the mutable defaults (dicts of options): one app
        # changing ``conf.broker_transport_options[...]`` must not change another's
        super().__init__(copy.deepcopy(DEFAULTS))
        if values:
            self.update(values)

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name: str, value: Any) -> None:
        self[name] = value

    def __setitem__(self, name: str, value: Any) -> None:
        if name not in DEFAULTS:
            _warn_setting(name)
        super().__setitem__(name, value)

    def update(self, *args: Any, **kwargs: Any) -> None:  # type: ignore[override]
        for key, value in dict(*args, **kwargs).items():
            self[key] = value

    def setdefault(self, key: str, default: Any = None) -> Any:
        if key not in self:
            self[key] = default
        return self[key]


def settings_from_object(obj: Any, namespace: str | None = None) -> dict[str, Any]:
    """Read settings from a module, a ``"module"`` / ``"module:attr"`` path or any object.

    With ``namespace="CELERY"`` only ``CELERY_*`` names are read and the prefix is
    dropped (``CELERY_BROKER_URL`` -> ``broker_url``), as Django projects configure Celery.
    """
    if isinstance(obj, str):
        module_name, _, attr = obj.partition(":")
        obj = importlib.import_module(module_name)
        if attr:
            obj = getattr(obj, attr)
    items: Iterable[tuple[str, Any]]
    items = obj.items() if isinstance(obj, Mapping) else vars(obj).items()
    found: dict[str, Any] = {}
    prefix = f"{namespace}_" if namespace else None
    for key, value in items:
        if prefix:
            if key.startswith(prefix):
                found[key[len(prefix):].lower()] = value
        elif not key.startswith("_") and key.islower() and not callable(value) \
                and type(value).__name__ != "module":
            found[key] = value
    return found


def masked_url(url: str | None) -> str:
    """``url`` with its password shown as ``**`` (as Celery prints broker URLs)."""
    if not url:
        return str(url)
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)
    user = netloc[0].split(":", 1)[0]
    return urlunsplit(parts._replace(netloc=f"{user}:**@{netloc[1]}"))
