"""Broken turnout settings fail at start with a message that names the fix."""

import pytest
from celery import Celery

from celery_turnout.errors import ImproperlyConfigured
from celery_turnout.settings import Settings


def an_app(**conf):
    app = Celery('settings', broker='redis://127.0.0.1:6379/0')
    app.conf.update(conf)
    return app


def test_defaults_detect_a_dead_worker_within_one_and_a_half_intervals():
    settings = Settings.from_app(an_app())
    assert settings.supervise_interval == 5.0
    assert settings.detection_bound == 7.5


@pytest.mark.parametrize('conf, complaint', [
    ({'turnout_supervise_interval': 0}, 'turnout_supervise_interval'),
    ({'turnout_supervise_interval': 'fast'}, 'turnout_supervise_interval'),
    ({'turnout_supervise_interval': 2, 'turnout_grace': 2}, 'shorter than'),
    ({'turnout_shutdown': 'never'}, 'turnout_shutdown'),
    ({'turnout_max_takeovers': -1}, 'turnout_max_takeovers'),
    ({'turnout_max_takeovers': True}, 'turnout_max_takeovers'),
    ({'turnout_monitor_prefetch': 70000}, 'from 1 to 65535'),
    ({'turnout_monitor_prefetch': 0.5}, 'turnout_monitor_prefetch'),
    ({'turnout_monitor_prefetch': 0}, 'turnout_monitor_prefetch'),
    ({'turnout_queue_prefix': 'a:b'}, 'turnout_queue_prefix'),
    ({'turnout_queue_expires': 1}, 'turnout_queue_expires'),
    ({'turnout_supervise_interval': 0.05}, 'use at least 0.1 s'),
    ({'turnout_record_ttl': 60}, 'turnout_record_ttl'),
])
def test_a_bad_setting_is_refused_by_name(conf, complaint):
    with pytest.raises(ImproperlyConfigured, match=complaint):
        Settings.from_app(an_app(**conf))


def test_the_shortest_supervise_interval_is_accepted():
    settings = Settings.from_app(an_app(turnout_supervise_interval=0.1))
    assert settings.supervise_interval == 0.1


def test_a_record_ttl_must_outlast_ten_detection_bounds():
    # 2 s interval and 1 s grace: a detection bound of 3 s, a floor of 30 s.
    conf = {'turnout_supervise_interval': 2, 'turnout_grace': 1}
    assert Settings.from_app(an_app(turnout_record_ttl=30, **conf)).record_ttl == 30
    with pytest.raises(ImproperlyConfigured) as refused:
        Settings.from_app(an_app(turnout_record_ttl=29, **conf))
    message = str(refused.value)
    assert '10 detection bounds (interval + grace), 30 s' in message
    assert 'stored message' in message and 'lost' in message


def test_the_store_comes_from_a_redis_result_backend_first():
    app = Celery('s', broker='amqp://', backend='redis://127.0.0.1:6379/3')
    assert Settings.from_app(app).store_url == 'redis://127.0.0.1:6379/3'


def test_the_filesystem_broker_keeps_its_store_next_to_its_data(tmp_path):
    app = Celery('s', broker='filesystem://')
    app.conf.broker_transport_options = {'data_folder_in': str(tmp_path / 'in')}
    assert Settings.from_app(app).store_url == f'file://{tmp_path}/turnout-store'


def test_rabbitmq_without_a_redis_backend_asks_for_a_store():
    app = Celery('s', broker='amqp://', backend='rpc://')
    with pytest.raises(ImproperlyConfigured, match='turnout_store_url'):
        Settings.from_app(app)


def test_a_setting_that_is_not_a_finite_number_is_refused():
    with pytest.raises(ImproperlyConfigured, match='turnout_supervise_interval'):
        Settings.from_app(an_app(turnout_supervise_interval=float('nan')))


@pytest.mark.parametrize('option, value', [
    ('supervise_interval', -1), ('supervise_interval', float('nan')),
    ('max_takeovers', -1), ('max_takeovers', 1.5), ('stall_timeout', 0),
    ('supervise_interval', 0.01),
])
def test_a_bad_task_option_is_refused_when_the_task_is_declared(option, value):
    from celery_turnout import turnout_task

    app = an_app()
    app.finalize()
    with pytest.raises(ImproperlyConfigured, match=option):
        # Not shared: a shared task would be bound again to every later app.
        @turnout_task(app, name=f'bad.{option}', shared=False, **{option: value})
        def job():
            pass
