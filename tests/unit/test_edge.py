"""The Edge addon: its options, `rawtcp` kept off, and its HTTP layer in place of mitmproxy's."""

import pytest
from mitmproxy import exceptions
from mitmproxy.proxy import context, layer
from mitmproxy.proxy.layers import http as http_layers
from mitmproxy.proxy.layers import tcp, tls
from mitmproxy.test import taddons, tflow

from mitm_outpost.edge import Edge
from mitm_outpost.edge_rules import Limits
from mitm_outpost.strict_http import Closing, StrictHttpLayer


def test_limits_come_from_the_options_and_bad_ones_are_refused() -> None:
    edge = Edge()
    with taddons.context(edge) as tctx:
        tctx.configure(edge, outpost_max_header_count=7, outpost_upstream_timeout=3)
        assert edge.limits == Limits(header_count=7, upstream_timeout=3)
        for bad in ({"outpost_max_header_count": 0}, {"outpost_header_timeout": 0},
                    {"outpost_max_header_size": 10, "outpost_max_request_line": 100}):
            with pytest.raises(exceptions.OptionsError):
                tctx.configure(edge, **bad)
        assert edge.limits.header_count == 7


def test_no_connection_becomes_a_raw_tcp_relay() -> None:
    edge = Edge()
    with taddons.context(edge) as tctx:
        tctx.configure(edge, rawtcp=True)
        assert tctx.options.rawtcp is False


def test_mitmproxys_http_layer_is_replaced_by_the_strict_one() -> None:
    edge = Edge()
    with taddons.context(edge) as tctx:
        tctx.configure(edge, outpost_max_header_count=9)
        ctx = context.Context(tflow.tclient_conn(), tctx.options)
        nextlayer = layer.NextLayer(ctx)
        nextlayer.layer = http_layers.HttpLayer(ctx, http_layers.HTTPMode.transparent)
        edge.next_layer(nextlayer)
        assert type(nextlayer.layer) is StrictHttpLayer and nextlayer.layer.limits.header_count == 9
        assert nextlayer.layer.mode is http_layers.HTTPMode.transparent
        assert [type(x) for x in ctx.layers] == [StrictHttpLayer]  # the replaced layer is gone from the stack


def test_behind_client_tls_the_http_layer_is_the_strict_one_too() -> None:
    """On 9443 mitmproxy picks client TLS with HTTP under it, in one stack."""
    edge = Edge()
    with taddons.context(edge) as tctx:
        ctx = context.Context(tflow.tclient_conn(), tctx.options)
        nextlayer = layer.NextLayer(ctx)
        tcp.TCPLayer(ctx)  # stands for the proxy-mode layer under the TLS one (ClientTLSLayer looks at it)
        client_tls = tls.ClientTLSLayer(ctx)
        client_tls.child_layer = http_layers.HttpLayer(ctx, http_layers.HTTPMode.transparent)
        nextlayer.layer = client_tls
        edge.next_layer(nextlayer)
        assert nextlayer.layer is client_tls and type(client_tls.child_layer) is StrictHttpLayer


def test_a_stack_that_is_not_http_is_closed() -> None:
    edge = Edge()
    with taddons.context(edge) as tctx:
        ctx = context.Context(tflow.tclient_conn(), tctx.options)
        nextlayer = layer.NextLayer(ctx)
        nextlayer.layer = tcp.TCPLayer(ctx)
        edge.next_layer(nextlayer)
        assert type(nextlayer.layer) is Closing
