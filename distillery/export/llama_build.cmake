# Included after every project() call of the llama-cpp-python build (CMAKE_PROJECT_INCLUDE, set by
# distillery/export/llama_build.py). llama-cpp-python forces LLAMA_BUILD_COMMON on, but its Python binding loads only
# libllama and libggml*: llama.cpp's `common` library (chat parsers, argument parsing, an HTTP client with
# OpenSSL) is half the compile time and is never used. Turning it off again here, after llama.cpp's own
# project() call, leaves every library the binding loads as it was.
set(LLAMA_BUILD_COMMON OFF CACHE BOOL "llama.cpp common library: not used by the Python binding" FORCE)
