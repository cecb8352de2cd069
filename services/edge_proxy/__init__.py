"""Ferrylink edge-proxy service (SFTP/HTTPS in the DMZ): not built yet, see README "Status"."""
