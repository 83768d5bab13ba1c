"""PostgreSQL: connecting, the LISTEN connection, and the pipelined NOTIFY senders.

The only package that imports psycopg.
"""
