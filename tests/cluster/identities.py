"""API clients that act as someone other than the admin, for RBAC tests."""

import urllib3
from kubernetes import client, config


class _ImpersonatingPool:
    """Adds impersonation headers to every request of a kubernetes ApiClient.

    The generated client keeps headers in a plain dict, which cannot repeat a header, and
    the apiserver reads each group from its own `Impersonate-Group` line; urllib3's
    HTTPHeaderDict sends repeated values as separate lines.
    """

    def __init__(self, pool, user: str, groups: list[str]):
        self._pool, self._user, self._groups = pool, user, groups

    def request(self, method, url, headers=None, **kwargs):
        merged = urllib3.HTTPHeaderDict(headers or {})
        merged["Impersonate-User"] = self._user
        for group in self._groups:
            merged.add("Impersonate-Group", group)
        return self._pool.request(method, url, headers=merged, **kwargs)

    def __getattr__(self, name):
        return getattr(self._pool, name)


def impersonating_client(admin_kubeconfig: str, user: str,
                         groups: list[str] | None = None) -> client.ApiClient:
    """An ApiClient authenticated as the admin but acting as `user`.

    With no groups the apiserver fills in those a real token would carry: for
    `system:serviceaccount:NS:NAME` that is system:serviceaccounts and
    system:serviceaccounts:NS, plus system:authenticated for everyone.
    """
    api = config.new_client_from_config(config_file=admin_kubeconfig)
    api.rest_client.pool_manager = _ImpersonatingPool(
        api.rest_client.pool_manager, user, list(groups or []))
    return api


def service_account_user(namespace: str, name: str) -> str:
    return f"system:serviceaccount:{namespace}:{name}"
