# The job server spec Gearman::Worker and Gearman::Client 2.004 take, for tests/peers/*.pl:
# HOST:PORT as it is, or over TLS the hash the library reads (use_ssl, ca_file, cert_file,
# key_file: IO::Socket::SSL, which checks the server's certificate against ca_file and its
# name against HOST).
package TlsJobServer;
use strict;
use warnings;

sub job_server {
    my ($address, $tls, $ca, $cert, $key) = @_;
    return $address unless $tls;
    my ($host, $port) = ($address =~ /^\[?(.*?)\]?:(\d+)$/) or die "not HOST:PORT: $address\n";
    return {
        host    => $host,
        port    => $port,
        use_ssl => 1,
        (defined $ca   ? (ca_file   => $ca)   : ()),
        (defined $cert ? (cert_file => $cert) : ()),
        (defined $key  ? (key_file  => $key)  : ()),
    };
}

1;
