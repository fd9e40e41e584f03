-- Runs once, on the first start of an empty PostgreSQL volume (docker-entrypoint-initdb.d):
-- POSTGRES_DB created `mlflow`; Prefect's server gets a database of its own.
CREATE DATABASE prefect;
