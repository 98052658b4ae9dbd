"""Settings come from the environment, Celery config overrides them, secrets stay hidden."""

from __future__ import annotations

import pytest

from op_celery import ConfigurationError, Secret, load_settings

ENV = {
    "OPENPANEL_CLIENT_ID": "cid",
    "OPENPANEL_CLIENT_SECRET": "top-secret",
    "OPENPANEL_SHOP_CLIENT_ID": "shop-id",
    "OPENPANEL_SHOP_CLIENT_SECRET": "shop-secret",
    "OPENPANEL_SHOP_API_URL": "https://analytics.shop.example",
}


def test_broker_url_prefers_op_celery_then_celery_then_redis_url() -> None:
    assert load_settings(env={"REDIS_URL": "redis://r/1"}).broker_url == "redis://r/1"
    env = {"REDIS_URL": "redis://r/1", "CELERY_BROKER_URL": "amqp://c//"}
    assert load_settings(env=env).broker_url == "amqp://c//"
    env["OP_CELERY_BROKER_URL"] = "redis://o/2"
    settings = load_settings(env=env)
    assert (settings.broker_url, settings.broker_url_source) == (
        "redis://o/2",
        "OP_CELERY_BROKER_URL",
    )


def test_celery_config_overrides_the_environment() -> None:
    settings = load_settings({"op_celery_queue": "analytics"}, env={"OP_CELERY_QUEUE": "x"})
    assert settings.queue == "analytics"
    project = load_settings({"openpanel_client_id": "from-conf"}, env=ENV).project()
    assert project.client_id == "from-conf"


def test_named_projects_have_their_own_credentials() -> None:
    settings = load_settings(env=ENV)
    shop = settings.project("shop")
    assert (shop.client_id, shop.client_secret.reveal()) == ("shop-id", "shop-secret")
    assert shop.api_url == "https://analytics.shop.example"
    assert settings.project().client_id == "cid"
    conf = {"openpanel_projects": {"blog": {"client_id": "b", "client_secret": "s"}}}
    assert load_settings(conf, env=ENV).project("blog").client_id == "b"


def test_unknown_project_names_the_variables_to_set() -> None:
    with pytest.raises(ConfigurationError, match="OPENPANEL_BLOG_CLIENT_ID"):
        load_settings(env=ENV).project("blog")
    with pytest.raises(ConfigurationError, match="CLIENT_SECRET"):
        load_settings(env={"OPENPANEL_CLIENT_ID": "x"}).project()


def test_secrets_are_redacted_in_repr() -> None:
    project = load_settings(env=ENV).project()
    assert "top-secret" not in repr(project)
    assert "top-secret" not in str(project.client_secret)
    assert "top-secret" not in repr(load_settings(env=ENV))
    assert Secret("a") == Secret("a")


def test_plain_http_is_refused_unless_loopback_or_allowed() -> None:
    env = {**ENV, "OPENPANEL_API_URL": "http://analytics.example.com"}
    with pytest.raises(ConfigurationError, match="https"):
        load_settings(env=env).project()
    assert load_settings(env={**env, "OPENPANEL_ALLOW_INSECURE_HTTP": "1"}).project()
    for url in ("http://127.0.0.1:8080", "http://localhost:1", "http://[::1]:9"):
        assert load_settings(env={**ENV, "OPENPANEL_API_URL": url}).project().api_url == url


@pytest.mark.parametrize(
    ("name", "value", "fragment"),
    [
        ("OP_CELERY_VISIBILITY_TIMEOUT", "soon", "number of seconds"),
        ("OP_CELERY_MAX_RETRIES", "-1", "negative"),
        ("OPENPANEL_ALLOW_INSECURE_HTTP", "maybe", "true or false"),
        ("OP_CELERY_LEDGER_TTL", "60", "must exceed OP_CELERY_VISIBILITY_TIMEOUT"),
        ("OP_CELERY_ON_PUBLISH_FAILURE", "drop", "'spool'"),
        ("OPENPANEL_RATE_HEADROOM", "75", "at most 50"),
        ("OP_CELERY_OUTBOX_GRACE", "0.5", "at least 1 second"),
        ("OP_CELERY_OUTBOX", "sometimes", "true or false"),
    ],
)
def test_bad_values_name_the_setting(name: str, value: str, fragment: str) -> None:
    with pytest.raises(ConfigurationError, match=name) as caught:
        load_settings(env={name: value})
    assert fragment in str(caught.value)


def test_the_outbox_is_on_by_default_and_can_be_switched_off() -> None:
    assert load_settings(env={}).outbox
    assert load_settings(env={"OP_CELERY_OUTBOX": ""}).outbox
    assert not load_settings(env={"OP_CELERY_OUTBOX": "off"}).outbox
    assert not load_settings({"op_celery_outbox": False}, env={}).outbox
    assert load_settings(env={"OP_CELERY_OUTBOX_GRACE": "5"}).outbox_grace_s == 5.0


def test_settings_are_a_hashable_value_holding_no_foreign_environment_and_no_plain_secret() -> None:
    from dataclasses import asdict

    env = {
        "OPENPANEL_CLIENT_ID": "cid",
        "OPENPANEL_CLIENT_SECRET": "sec_do_not_show",
        "OPENPANEL_SHOP_CLIENT_SECRET": "sec_shop_do_not_show",
        "AWS_SECRET_ACCESS_KEY": "aws_do_not_copy",
        "HOME": "/home/someone",
    }
    conf = {"openpanel_projects": {"eu": {"client_id": "e", "client_secret": "sec_eu_hidden"}}}
    settings = load_settings(conf, env)
    again = load_settings(conf, dict(env))
    assert settings == again and hash(settings) == hash(again)
    dumped = repr(asdict(settings))
    for value in ("sec_do_not_show", "sec_shop_do_not_show", "sec_eu_hidden", "aws_do_not_copy"):
        assert value not in dumped
    assert "HOME" not in dumped
    assert settings.project().client_secret.reveal() == "sec_do_not_show"
    assert settings.project("eu").client_secret.reveal() == "sec_eu_hidden"


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("https://user:pw@api.example.com/x", "https://user:***@api.example.com/x"),
        ("https://tok3n@api.example.com", "https://***@api.example.com"),
        ("redis://:pw@127.0.0.1:6379/0", "redis://:***@127.0.0.1:6379/0"),
        ("https://u:pw@[::1]:8443/", "https://u:***@[::1]:8443/"),
        ("https://api.example.com", "https://api.example.com"),
        ("http://u:pw@[::1", "http://u:***@[::1"),
        ("sentinel://h:1;sentinel://:pw@h2:2", "sentinel://h:1;sentinel://:***@h2:2"),
        ("redis+cluster://:pw@a:1,b:2/0", "redis+cluster://:***@a:1,b:2/0"),
        ("redis://:p@ss@h:1/0", "redis://:***@h:1/0"),
    ],
)
def test_redact_url_hides_every_credential_a_url_can_carry(url: str, shown: str) -> None:
    from op_celery._settings import redact_url

    assert redact_url(url) == shown


def test_an_api_url_password_never_reaches_an_error_text_or_the_clients_repr() -> None:
    from op_celery import NetworkError, OpenPanelClient, build_event

    from ._support import free_port

    url = f"http://user:hunter2@127.0.0.1:{free_port()}"
    client = OpenPanelClient("cid", "sec", url, connect_timeout_s=0.5)
    assert "hunter2" not in repr(client) and "hunter2" not in client.api_url
    with pytest.raises(NetworkError) as caught:
        client.send(build_event("track", {"name": "x"}))
    assert "hunter2" not in str(caught.value)
    with pytest.raises(ConfigurationError) as refused:
        load_settings(env={**ENV, "OPENPANEL_API_URL": "ftp://u:hunter2@h"}).project()
    assert "hunter2" not in str(refused.value)


def test_project_queues_are_a_list_of_named_projects_each_with_its_queue() -> None:
    settings = load_settings(
        env={"OP_CELERY_QUEUE": "op", "OP_CELERY_PROJECT_QUEUES": "shop, blog,"}
    )
    assert settings.project_queues == ("shop", "blog")
    assert settings.queues == ("op", "op.shop", "op.blog")
    assert (settings.queue_of("shop"), settings.queue_of("other")) == ("op.shop", "op")
    from_conf = load_settings({"op_celery_project_queues": ["shop"]}, env={})
    assert from_conf.project_queues == ("shop",)


@pytest.mark.parametrize("value", ["default", "shop,bad name", "a" * 65])
def test_project_queues_refuse_what_is_not_a_named_project(value: str) -> None:
    with pytest.raises(ConfigurationError, match=r"OP_CELERY_PROJECT_QUEUES: .* is not a named"):
        load_settings(env={"OP_CELERY_PROJECT_QUEUES": value})
