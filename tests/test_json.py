"""JSON out (every type PostgreSQL and actions hand back) and compression."""

from __future__ import annotations

import gzip

import brotli
import pytest
from backports import zstd

from lib.core.json import dumps


def test_python_types_encode(api):
    body = api.post('/probe/python_types').get_json()
    assert body == {
        'datetime': '2024-05-06T07:08:09.123000+00:00',
        'date': '2024-05-06',
        'time': '07:08:09',
        'decimal': '12345678901234567890.123456789',
        'uuid': '12345678-1234-5678-1234-567812345678',
        'timedelta': 3601.0,
        'bytes': 'AAE=',
        'memoryview': 'YWI=',
        'tuple': [1, 2],
    }


def test_postgres_types_encode(api):
    row = api.post('/probe/pg_types').get_json()
    assert row['num'] == '1.50'
    assert row['span'] == 3 * 86400 + 4 * 3600
    assert row['raw'] == 'AQI='
    assert row['doc'] == {'a': [1, 2]}
    assert row['arr'] == [1, 2]
    assert row['nothing'] is None
    assert row['t'] == '12:34:56'
    assert len(row['id']) == 36
    assert 'T' in row['ts'] and len(row['day']) == 10


def test_unknown_type_is_a_clear_error():
    with pytest.raises(TypeError, match='not JSON serializable: object'):
        dumps({'x': object()})


@pytest.mark.parametrize(
    ('encoding', 'decode'),
    [('gzip', gzip.decompress), ('br', brotli.decompress), ('zstd', zstd.decompress)],
)
def test_large_responses_are_compressed(api, encoding, decode):
    plain = api.post('/probe/big')
    response = api.post('/probe/big', headers={'Accept-Encoding': encoding})
    assert response.headers['Content-Encoding'] == encoding
    assert len(response.data) < len(plain.data)
    assert decode(response.data) == plain.data


def test_small_responses_are_not_compressed(api):
    response = api.post('/example/', headers={'Accept-Encoding': 'gzip'})
    assert 'Content-Encoding' not in response.headers
    assert response.get_json() is True
