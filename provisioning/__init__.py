"""The device-admin CLI (`yibao provision …`). It talks to the sync server over HTTP only and must never import
server or terminal code: what an admin can do is exactly what the server's API allows."""
