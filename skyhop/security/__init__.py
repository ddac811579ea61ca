"""The fleet's security files: the PKI (``pki``), the rights each identity has
(``acl``), their application to a running Mosquitto (``dynsec``) and the Mosquitto
configuration that enforces them (``mosquitto_conf``). docs/security.md."""
